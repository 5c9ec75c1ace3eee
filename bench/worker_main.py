"""``celery`` with the bench's phase stamps (``force_unlock.py --phases``):

    python bench/worker_main.py -A opsconsole worker ...

BENCH_PHASES_FILE names the file for the stamps. A run without ``--phases`` starts
``python -m celery``.
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

    if os.environ.get("BENCH_PHASES_FILE"):
        phases.install_worker_side(Path(os.environ["BENCH_PHASES_FILE"]))

    from celery.__main__ import main as celery_main

    sys.argv = ["celery", *sys.argv[1:]]
    celery_main()


if __name__ == "__main__":
    main()
