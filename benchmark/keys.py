"""Canonical identities of training runs and evaluations.  Torch-free.

A key is a short sha256 of canonical JSON (sorted keys, no whitespace) of the fully
resolved, type-checked config, so key order, written-out defaults and ``1`` vs ``1.0``
(already coerced by the schema) cannot change it, while the method version, backbone
version and dataset identity do.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

KEY_LENGTH = 12


def canonical_json(obj: Any) -> str:
    return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"))


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    return obj


def short_hash(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:KEY_LENGTH]
