"""Self-contained HTML reports: one file, images embedded, no network. Sections live in ``sec_*.py``."""

from .sections import SECTIONS, ReportContext, Section, all_sections, section

__all__ = ["SECTIONS", "ReportContext", "Section", "all_sections", "section"]
