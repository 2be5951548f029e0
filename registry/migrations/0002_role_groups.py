"""Create the role groups (admin, operator, viewer); rename the old `operators` group."""

from django.db import migrations

ROLE_GROUPS = ("admin", "operator", "viewer")
LEGACY, NEW = "operators", "operator"


def forwards(apps, schema_editor):
    Group = apps.get_model("auth", "Group")
    legacy = Group.objects.filter(name=LEGACY).first()
    current = Group.objects.filter(name=NEW).first()
    if legacy and not current:
        legacy.name = NEW
        legacy.save(update_fields=["name"])
    elif legacy and current:
        current.user_set.add(*legacy.user_set.all())
        legacy.delete()
    for name in ROLE_GROUPS:
        Group.objects.get_or_create(name=name)


def backwards(apps, schema_editor):
    Group = apps.get_model("auth", "Group")
    Group.objects.filter(name__in=("admin", "viewer")).delete()
    Group.objects.filter(name=NEW).update(name=LEGACY)


class Migration(migrations.Migration):
    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("registry", "0001_initial"),
    ]

    operations = [migrations.RunPython(forwards, backwards)]
