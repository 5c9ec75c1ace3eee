"""The runbook's Recovery Time Objectives, one row per scenario ("other" has none).

A concurrent migration conflict is the runbook's "lock deadlock" row, a production emergency its
"complete failure" row.
"""

import datetime as dt

from django.db import migrations

OBJECTIVES = [
    # scenario, runbook row, detect, mitigate, recover (minutes)
    ("migration_failure", "Migration failure", 1, 5, 30),
    ("concurrent_conflict", "Lock deadlock", 2, 5, 15),
    ("performance_degradation", "Performance degradation", 5, 10, 30),
    ("production_emergency", "Complete failure", 1, 2, 60),
]


def seed(apps, schema_editor):
    model = apps.get_model("incidents", "RecoveryObjective")
    for scenario, row, detect, mitigate, recover in OBJECTIVES:
        model.objects.get_or_create(
            scenario=scenario,
            defaults={
                "runbook_row": row,
                "detect_within": dt.timedelta(minutes=detect),
                "mitigate_within": dt.timedelta(minutes=mitigate),
                "recover_within": dt.timedelta(minutes=recover),
            },
        )


def unseed(apps, schema_editor):
    apps.get_model("incidents", "RecoveryObjective").objects.filter(
        scenario__in=[row[0] for row in OBJECTIVES]
    ).delete()


class Migration(migrations.Migration):
    dependencies = [("incidents", "0001_initial")]

    operations = [migrations.RunPython(seed, unseed)]
