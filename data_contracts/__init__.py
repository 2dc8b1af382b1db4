"""Arrow schemas and typed records for every artifact of a SEFE run; validation lives here."""

from data_contracts.artifacts import (
    INSTRUCTIONS,
    MATRICES,
    METRIC_TABLE,
    METRICS,
    ORIGINS,
    PREDICTIONS,
    REJECTS,
    SPLITS,
    STYLES,
    InstructionRecord,
    MetricRecord,
    PredictionRecord,
    RejectRecord,
)
from data_contracts.atomic import (
    FileInfo,
    atomic_path,
    file_info,
    mismatched,
    sha256_file,
    sha256_once,
    write_json,
)
from data_contracts.contract import Contract, ContractError

__all__ = [
    "INSTRUCTIONS",
    "MATRICES",
    "METRIC_TABLE",
    "METRICS",
    "ORIGINS",
    "PREDICTIONS",
    "REJECTS",
    "SPLITS",
    "STYLES",
    "Contract",
    "ContractError",
    "FileInfo",
    "InstructionRecord",
    "MetricRecord",
    "PredictionRecord",
    "RejectRecord",
    "atomic_path",
    "file_info",
    "mismatched",
    "sha256_file",
    "sha256_once",
    "write_json",
]
