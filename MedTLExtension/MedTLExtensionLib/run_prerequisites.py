"""What a run needs before it starts, asked of the user through Slicer's dialogs: the Python
packages, the pretrained weights, and a device that can be used.

Both MedTL modules call these before they start the engine (Learn, Apply, Adapt; Start, Resume).
The decisions are made Qt-free in :mod:`.dependencies` and :mod:`.weights_download`; this module
only supplies the confirmations, the progress dialog and the warnings, through ``slicer.util``
(which imports Qt when a dialog is shown, not when this module is imported).

Example (Python console)::

    from MedTLExtensionLib import run_prerequisites
    run_prerequisites.ensure_dependencies("train")
    run_prerequisites.ensure_default_weights("unet_mobilenet_v2", "imagenet")
    device = run_prerequisites.usable_device("auto")
"""

from __future__ import annotations

import logging

import slicer

from . import dependencies, weights_download
from .i18n import tr as _

_warned_devices: set[str] = set()


def ensure_dependencies(feature: str = "learn"):
    """Installs what ``feature`` needs after one confirmation; offers a restart if loaded packages
    changed. Returns what :func:`dependencies.ensure_dependencies` did (``installed`` lists the
    packages installed now)."""

    def install_torch(torch_requirement: str, torchvision_requirement: str) -> bool:
        import PyTorchUtils

        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=True,
            torchVersionRequirement=torch_requirement,
            torchvisionVersionRequirement=torchvision_requirement,
        )
        return torch is not None

    result = dependencies.ensure_dependencies(
        feature,
        confirm=lambda message: slicer.util.confirmOkCancelDisplay(message, windowTitle=_("MedTL: install packages")),
        install_torch=install_torch if hasattr(slicer.modules, "pytorchutils") else None,
        pip_install=dependencies.slicer_pip_install,
        testing=slicer.app.testingEnabled(),
    )
    if result.installed:
        logging.info(f"MedTL installed: {', '.join(result.installed)}")
    if result.restart_needed and slicer.util.confirmYesNoDisplay(
        _("Packages that were already loaded were updated. Restart Slicer now so that MedTL uses them?"),
        windowTitle=_("MedTL: restart needed"),
    ):
        slicer.util.restart()
    return result


def ensure_default_weights(network: str, pretrained: str = "imagenet") -> None:
    """Downloads the ImageNet weights a first run needs, after one confirmation, with a progress dialog."""
    if weights_download.needed_weights(network, pretrained) is None:
        return
    dialog = None

    def confirm(text: str) -> bool:
        # A self-test must neither block on a dialog nor download.
        return not slicer.app.testingEnabled() and slicer.util.confirmOkCancelDisplay(
            text, windowTitle=_("MedTL: download pretrained weights")
        )

    def progress(done: int, total: int | None) -> bool:
        nonlocal dialog
        if dialog is None:
            dialog = slicer.util.createProgressDialog(
                windowTitle=_("MedTL"), labelText=_("Downloading the ImageNet weights..."), maximum=100
            )
        dialog.value = int(100 * done / total) if total else 0
        slicer.app.processEvents()
        return not dialog.wasCanceled

    try:
        path = weights_download.ensure_weights(network, pretrained, confirm=confirm, progress=progress)
    finally:
        if dialog is not None:
            dialog.close()
    logging.info(f"MedTL downloaded {path}")


def usable_device(device: str) -> str:
    """Where a run on ``device`` will compute, from the session's background device check.

    Never waits: while the check is still running the engine decides itself (and says so in the
    status line). A GPU that cannot be used is explained once per session.
    """
    if device == "cpu":
        return device
    report = dependencies.DEVICE_CHECK.report(device)
    if report is None:
        return device
    if report.get("warning") and device not in _warned_devices:
        _warned_devices.add(device)
        slicer.util.warningDisplay(
            _(
                "{warning}.\n\nMedTL will train on the CPU (slower). To use the GPU, reinstall PyTorch for it in"
                " the PyTorch Utils module."
            ).format(warning=report["warning"]),
            windowTitle=_("MedTL: GPU not usable"),
        )
    return report.get("device", device)
