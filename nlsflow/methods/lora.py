"""Plain LoRA: the profile's target modules at its maximal rank on the dense base, no elasticity.

The baseline row of every table. Its search space holds one subnet (every group at its first choice), so the
search scores that one and stops, and `extract` writes the trained adapter as it is (checked like any other).
"""

from __future__ import annotations

from nlsflow.adapters.elastic import ElasticGroup
from nlsflow.methods.base import Method, collapsed


class Lora(Method):
    name = "lora"

    def rank_groups(self) -> list[ElasticGroup]:
        return collapsed(super().rank_groups())
