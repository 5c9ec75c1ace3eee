from django.contrib.admin.apps import AdminConfig


class OpsAdminConfig(AdminConfig):
    """Django's admin with the console's own site (``opsconsole.admin_site``) as ``admin.site``."""

    default_site = "opsconsole.admin_site.OpsAdminSite"
