"""Translation of the library's user-facing texts through Slicer's i18n, in the "MedTL" context.

Where Slicer's i18n is missing (slicer-core in the headless tests) a text is returned unchanged.

Example:
    >>> from MedTLExtensionLib.i18n import tr as _
    >>> _("MedTL: install packages")
    'MedTL: install packages'
"""

from __future__ import annotations


def tr(text: str) -> str:
    """``text`` translated in the "MedTL" context, or unchanged where Slicer's i18n is missing."""
    try:
        from slicer.i18n import translate
    except ImportError:
        return text
    return translate("MedTL", text)
