"""``celery``, plus the bench's variants and phase stamps:

    python bench/worker_main.py -A opsconsole worker ...

Used by ``force_unlock.py --phases`` / ``--variant``; a plain run starts ``python -m celery``.
BENCH_VARIANTS lists the variants to apply; BENCH_PHASES_FILE names the file for the stamps.
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
    import variants

    variants.apply(variants.from_environment())  # first: the phase wrappers wrap the variants
    if os.environ.get("BENCH_PHASES_FILE"):
        phases.install_worker_side(Path(os.environ["BENCH_PHASES_FILE"]))

    from celery.__main__ import main as celery_main

    sys.argv = ["celery", *sys.argv[1:]]
    celery_main()


if __name__ == "__main__":
    main()
