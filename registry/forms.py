"""Portal forms for the registry pages."""

from __future__ import annotations

from django import forms

from registry.models import Model, ModelFormat


class ModelCreateForm(forms.ModelForm):
    class Meta:
        model = Model
        fields = ["name", "description"]


class VersionUploadForm(forms.Form):
    """Fields beside the artifact; the artifact itself streams through our upload handler."""

    signature = forms.CharField(
        widget=forms.Textarea(attrs={
            "rows": 8, "placeholder": "leave empty: read from the file (ONNX, torch.export, or "
                                     "TorchScript with an example input below)"}),
        required=False,
        help_text='JSON: {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}], '
                  '"outputs": [...]}; checked against what the file says',
    )
    example_input = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "placeholder": '[{"name": "x", "datatype": '
                                                               '"FP32", "shape": [-1, 4]}]'}),
        required=False,
        help_text="TorchScript without a signature: its inputs once (-1 = variable); the "
                  "outputs are observed from the model",
    )
    metadata = forms.CharField(widget=forms.Textarea(attrs={"rows": 4}), required=False,
                               help_text="optional JSON object")
    steps = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 6, "placeholder": '{"inputs": [{"input": "image", '
                                     '"name": "image_bytes", "scale": 0.00392}], "outputs": '
                                     '[{"output": "logits", "softmax": true, "top_k": 5, '
                                     '"labels": "labels"}]}'}),
        required=False,
        help_text="optional JSON: decode JPEG/PNG into an input; softmax, top-k and labels on "
                  "an output (labels from the file below)")
    format = forms.ChoiceField(choices=[("", "detect from the file"), *ModelFormat.choices],
                               required=False)


class AliasMoveForm(forms.Form):
    alias = forms.RegexField(regex=r"^[a-z][a-z0-9_-]{0,62}$", max_length=63)
    version = forms.IntegerField(min_value=1)
