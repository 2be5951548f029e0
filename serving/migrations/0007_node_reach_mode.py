from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("serving", "0006_node_certificates"),
    ]

    operations = [
        migrations.AddField(
            model_name="node",
            name="reach_mode",
            field=models.CharField(choices=[("direct", "direct"), ("tunnel", "tunnel")],
                                   default="direct", max_length=8),
        ),
    ]
