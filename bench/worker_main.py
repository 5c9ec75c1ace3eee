"""``celery`` with the bench's phase stamps: ``python bench/worker_main.py -A opsconsole worker ...``

Used only by ``force_unlock.py --phases``; a plain run starts ``python -m celery`` itself.
BENCH_PHASES_FILE names the file the stamps go to.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]


def main() -> None:
    import django

    django.setup()

    import phases

    phases.install_worker_side(Path(os.environ["BENCH_PHASES_FILE"]))

    from celery.__main__ import main as celery_main

    sys.argv = ["celery", *sys.argv[1:]]
    celery_main()


if __name__ == "__main__":
    main()
