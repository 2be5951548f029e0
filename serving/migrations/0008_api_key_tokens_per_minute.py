import django.core.validators
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("serving", "0007_node_reach_mode"),
    ]

    operations = [
        migrations.AddField(
            model_name="apikey",
            name="rate_limit_tokens_per_minute",
            field=models.PositiveIntegerField(
                blank=True, help_text="empty: unlimited", null=True,
                validators=[django.core.validators.MinValueValidator(1),
                            django.core.validators.MaxValueValidator(1000000000)]),
        ),
    ]
