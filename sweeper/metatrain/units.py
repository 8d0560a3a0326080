"""Unit conversion with metatomic's own factors: every number we report is in meV.

metatrain trains and logs in the units of the data (eV, hartree, kcal/mol, ... and
angstrom or bohr); we convert energies to meV, forces to meV/Å and stresses to meV/Å³
with `metatomic.torch.unit_conversion_factor`, the factors metatomic applies when an
exported model runs in an MD engine, so numbers agree with what users see there.
"""

from __future__ import annotations

import functools

from metatomic.torch import unit_conversion_factor

ENERGY, FORCE, STRESS = "meV", "meV/A", "meV/A^3"


@functools.lru_cache(maxsize=64)
def factor(unit: str, to: str) -> float:
    """How many `to` make one `unit`; ValueError for an unknown unit or another dimension."""
    if unit == to:
        return 1.0
    return float(unit_conversion_factor(unit, to))


def force_unit(energy_unit: str, length_unit: str) -> str:
    return f"{energy_unit}/{length_unit}"


def stress_unit(energy_unit: str, length_unit: str) -> str:
    return f"{energy_unit}/{length_unit}^3"
