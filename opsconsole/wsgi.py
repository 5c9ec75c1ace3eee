import gc
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "opsconsole.settings")

application = get_wsgi_application()
# Start-up objects live as long as the process: keep full garbage collections off them.
gc.freeze()
