import gc
import os
import sys

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "opsconsole.settings")

application = get_wsgi_application()
# Start-up objects live as long as the process: keep full garbage collections off them.
gc.freeze()
# A request waits for the GIL at most 1 ms (not Python's 5) while a thread of the same process
# holds it, such as the status API reading the targets again (status p99 33-35 ms instead of
# 41 ms in bench/status_api.py).
sys.setswitchinterval(0.001)
