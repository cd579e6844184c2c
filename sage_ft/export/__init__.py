"""Export a fine-tune: merge the LoRA into its base, verify it, convert to GGUF, zip it for download.

Heavy libraries are imported inside the functions, so importing this package stays fast.
"""

from sage_ft.export.archive import zip_export
from sage_ft.export.gguf_export import (
    GGUF_OUTTYPES,
    SUPPORTED_GGUF_ARCHITECTURES,
    GGUFExport,
    GGUFVerifyError,
    convert_to_gguf,
    export_gguf,
    verify_gguf,
)
from sage_ft.export.merge import DTYPES, ExportResult, merge_lora, parse_size, read_export_record
from sage_ft.export.source import ExportCancelled, ExportError, ExportSource, resolve_source, run_dir_for
from sage_ft.export.verify import VerifyResult, verify_merge

__all__ = [
    "DTYPES", "GGUF_OUTTYPES", "SUPPORTED_GGUF_ARCHITECTURES", "ExportCancelled", "ExportError", "ExportResult",
    "ExportSource", "GGUFExport", "GGUFVerifyError", "VerifyResult", "convert_to_gguf", "export_gguf", "merge_lora", "parse_size", "read_export_record",
    "resolve_source", "run_dir_for", "verify_gguf", "verify_merge", "zip_export",
]
