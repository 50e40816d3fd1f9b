"""The page: a side panel (Volume, Segment, Mask-in-mask preview, Fine-tune) beside the
Slicer views. Widgets carry ``id``s the browser tests (and users' scripts) address."""

from __future__ import annotations

from trame.ui.vuetify3 import SinglePageWithDrawerLayout
from trame.widgets import client, html
from trame.widgets import vuetify3 as v3

from MiMStudio.app import StudioApp

CSS = """
html { overflow-y: auto; }
.mim-section { font-weight: 600; font-size: 0.95rem; margin: 14px 0 6px; }
.mim-status { font-size: 0.8rem; min-height: 1.2em; }
.mim-swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 6px; }
"""


def _progress(kind: str, label: str, action: str, disabled: str = "false") -> None:
    with html.Div(classes="d-flex align-center ga-2 mt-2"):
        v3.VBtn(label, id=f"{kind}-btn", color="primary", size="small",
                disabled=(f"{kind}_running || {disabled}",), click=action)
        v3.VBtn("Cancel", id=f"{kind}-cancel", size="small", variant="outlined",
                v_show=(f"{kind}_running",), click=f"trigger('cancel', ['{kind}'])")
    v3.VProgressLinear(model_value=(f"{kind}_progress",), height=6, classes="mt-2", id=f"{kind}-progress",
                       v_show=(f"{kind}_running || {kind}_progress",),
                       color="primary", indeterminate=(f"{kind}_running && !{kind}_progress",))
    html.Div(f"{{{{ {kind}_status }}}}", id=f"{kind}-status", classes="mim-status mt-1")


def build_ui(app: StudioApp):
    server = app.server
    with SinglePageWithDrawerLayout(server, theme="dark") as layout:
        layout.title.set_text("MiM Studio")
        layout.root.theme = "dark"
        client.Style(CSS)
        with layout.toolbar:
            v3.VSpacer()
            html.Div("Preview, left to right: hidden input - reconstruction - original", id="preview-caption",
                     classes="mr-4 text-caption", v_show=("layout === 'preview'",))
            html.Div("{{ volume_name }}", id="volume-name", classes="mr-4 text-caption")
            with v3.VBtnToggle(v_model=("layout",), mandatory=True, density="compact", classes="mr-2"):
                v3.VBtn("Segment views", value="segment", size="small", id="layout-segment")
                v3.VBtn("Preview views", value="preview", size="small", id="layout-preview")
        with layout.drawer as drawer:
            drawer.width = 380
            with html.Div(classes="pa-3"):
                v3.VAlert(text=("alert_text",), type=("alert_type",), v_show=("alert_text",), density="compact",
                          closable=True, id="alert", classes="mb-2", click_close="alert_text = ''")

                html.Div("Volume", classes="mim-section")
                v3.VSelect(label="Sample, data folder or upload", v_model=("volume_choice",), items=("volumes",),
                           item_title="title", item_value="value", density="compact", hide_details=True,
                           id="volume-select")
                with html.Div(classes="d-flex align-center ga-2 mt-2"):
                    v3.VBtn("Load", id="load-btn", size="small", color="primary",
                            click="trigger('load_volume', [volume_choice])")
                    v3.VFileInput(label="Upload a volume", density="compact", hide_details=True, id="upload",
                                  accept=".nii,.nii.gz,.nrrd,.nhdr,.mha,.mhd", prepend_icon="mdi-upload",
                                  change=("(f = $event.target.files[0]) && (f.size > upload_limit"
                                          " ? trigger('upload_too_large', [f.name, f.size])"
                                          " : trigger('upload', [$event.target.files]))"))

                html.Div("Segment", classes="mim-section")
                v3.VSelect(label="Model", v_model=("model_choice",), items=("models",), item_title="title",
                           item_value="value", density="compact", hide_details=True, id="model-select")
                v3.VCheckbox(label="Fast (CPU)", v_model=("segment_fast",), density="compact", hide_details=True,
                             id="segment-fast", disabled=("segment_running",),
                             title=("mim segment --fast: the network only where the body is, in OpenVINO fp32 "
                                    "where installed (the default path's labels), else bf16 where the CPU has "
                                    "it. Ticked when the server found no GPU."))
                _progress("segment", "Segment", "trigger('segment', [model_choice])")
                with html.Div(id="segment-list", v_show=("segments.length",), classes="mt-1"):
                    with html.Div(v_for="s in segments", key="s.id", classes="text-caption segment-item"):
                        html.Span(classes="mim-swatch", style=("{background: s.color}",))
                        html.Span("{{ s.name }}", classes="segment-name")
                        html.Span("{{ s.ml }} ml", classes="ml-2 text-grey segment-ml")
                with html.Div(classes="d-flex ga-2 mt-2", v_if=("has_segmentation",)):
                    v3.VBtn(".seg.nrrd", id="download-seg", size="small", prepend_icon="mdi-download",
                            click=("utils.download(download_base + '.seg.nrrd', trigger('download_seg_nrrd'), "
                                   "'application/octet-stream')"))
                    v3.VBtn("NIfTI", id="download-nifti", size="small", prepend_icon="mdi-download",
                            click=("utils.download(download_base + '_labels.nii.gz', trigger('download_nifti'), "
                                   "'application/octet-stream')"))

                with html.Div(classes="d-flex ga-2 mt-2", v_if=("volume_name",)):
                    v3.VBtn("Axial PNG", id="download-png", size="small", prepend_icon="mdi-camera",
                            click="utils.download('axial.png', trigger('snapshot', ['Red']), 'image/png')")
                    v3.VBtn("3D PNG", id="download-3d-png", size="small", prepend_icon="mdi-camera",
                            click="utils.download('3d.png', trigger('snapshot', ['ThreeD']), 'image/png')")

                html.Div("Mask-in-mask preview", classes="mim-section")
                v3.VSelect(label="Pre-training run", v_model=("checkpoint_choice",), items=("checkpoints",),
                           item_title="title", item_value="value", density="compact", hide_details=True,
                           id="checkpoint-select")
                with html.Div(classes="d-flex align-center ga-2 mt-2 text-caption"):
                    html.Span("Centre: {{ preview_center_text }}", id="preview-center")
                    v3.VBtn("Pick", id="pick-center", size="x-small", variant="outlined",
                            color=("pick_center ? 'warning' : undefined",),
                            click="pick_center = !pick_center; layout = 'segment'")
                _progress("preview", "Preview", "trigger('preview', [checkpoint_choice])")
                v3.VSelect(label="Level", v_model=("preview_level",), items=("preview_levels",), item_title="title",
                           item_value="value", density="compact", hide_details=True, id="level-select",
                           v_show=("preview_levels.length",), classes="mt-1")
                v3.VSelect(label="Volume of the level", v_model=("preview_volume",), items=("preview_volumes",),
                           item_title="title", item_value="value", density="compact", hide_details=True,
                           id="volume-index-select", v_show=("preview_volumes.length > 1",), classes="mt-1")

                html.Div("Fine-tune", classes="mim-section")
                with html.Div(classes="d-flex align-center ga-2"):
                    v3.VSelect(label="Paint segment", v_model=("paint_segment",), items=("segments",),
                               item_title="name", item_value="id", density="compact", hide_details=True,
                               id="paint-segment", v_show=("segments.length",))
                    v3.VBtn("Paint", id="paint-btn", size="small", v_show=("!painting",),
                            click="trigger('start_paint')")
                    v3.VBtn("Stop painting", id="stop-paint-btn", size="small", color="warning",
                            v_show=("painting",), click="trigger('stop_paint')")
                with html.Div(classes="d-flex align-center ga-2 mt-2"):
                    v3.VBtn("Add current case", id="add-case-btn", size="small", prepend_icon="mdi-plus",
                            disabled=("!has_segmentation",), click="trigger('add_case')")
                    html.Div("{{ ft_cases_text }}", id="cases-text", classes="text-caption")
                with html.Div(id="case-list", v_show=("ft_cases.length",), classes="mt-1"):
                    with html.Div(v_for="c in ft_cases", key="c.index", classes="d-flex align-center case-item"):
                        html.Span("{{ c.index + 1 }}. {{ c.volume }} - {{ c.segmentation }}",
                                  classes="text-caption case-name")
                        v3.VBtn(icon="mdi-close", size="x-small", variant="text", density="compact",
                                classes="case-remove ml-1", title="Remove this case",
                                click="trigger('remove_case', [c.index])")
                with html.Div(classes="d-flex ga-2 mt-2"):
                    v3.VTextField(label="Steps", v_model=("ft_steps",), type="number", density="compact",
                                  hide_details=True, id="ft-steps")
                    v3.VTextField(label="New model name", v_model=("ft_name",), density="compact",
                                  hide_details=True, id="ft-name")
                    v3.VTextField(label="Spacing mm", v_model=("ft_spacing",), density="compact",
                                  hide_details=True, id="ft-spacing", placeholder="model's")
                _progress("finetune", "Fine-tune", "trigger('finetune', [ft_steps, ft_name, ft_spacing, model_choice])")
                with html.Div(v_show=("Object.keys(ft_curves).length",), id="ft-curves", classes="mt-1"):
                    html.Div(v_html=("ft_curves.svg",), id="curve-svg")
                    html.Div("loss {{ ft_curves.loss ? ft_curves.loss.last : '-' }} (orange) - "
                             "Dice {{ ft_curves.dice ? ft_curves.dice.last : '-' }} (green)",
                             classes="text-caption")
                html.Div("New model: {{ ft_last }}", id="ft-last", v_show=("ft_last",), classes="text-caption")
        with layout.content:
            app.layout_manager.initialize_layout_grid(layout)
    return layout
