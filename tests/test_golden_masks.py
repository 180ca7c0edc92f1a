"""Every method's masks stay bit-identical to those recorded before the pipeline was rebuilt.

Digests in ``tests/golden/masks.json`` (see ``tests/golden/cases.py``). The whole comparison runs
about 80 s on 2 cores (probe cases dominate), so it runs under ``pytest -m slow`` (CI runs it).
"""

import pytest

from tests.golden.cases import CASES, recorded, run_case

RECORDED = recorded()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_masks_unchanged(name):
    assert name in RECORDED, f"no recorded digest for {name}; record it from the reference commit"
    assert run_case(name) == RECORDED[name], f"{name}: masks differ from the recorded ones"
