"""A Modbus register map entry (`registers:` in a device or a profile) as a plain dataclass.

Pydantic validates it inside the config (see `agent.config`); drivers use it as is. Decoding lives
in `drivers.modbus_codec`; grouping into requests in `drivers.planner`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import ConfigDict

RegisterType = Literal["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "bool"]
WordOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]
Table = Literal["holding", "input", "coil", "discrete"]


@dataclass(frozen=True)
class RegisterSpec:
    """One channel read from a Modbus device: where it is, how to decode it, how to scale it."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    channel: str
    address: int
    type: RegisterType = "uint16"
    order: WordOrder = "ABCD"
    table: Table = "holding"
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = None
