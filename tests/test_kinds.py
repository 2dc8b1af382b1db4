"""Task kinds as units (sefe_core/kinds/<kind>/): every registered kind is complete on its own,
and the benchmarks are built from the registry, in CoIN's order."""

from __future__ import annotations

import numpy as np
import pytest

from sefe_core.kinds import KINDS, get_kind
from sefe_core.registry import COIN_TASKS, SCORERS, benchmark_tasks
from sefe_core.rewriter_served import load_prompt
from sefe_core.styles import format_ok


def test_the_sequence_is_the_registry_in_coins_order() -> None:
    assert list(KINDS) == [
        "scienceqa",
        "textvqa",
        "imagenet",
        "gqa",
        "vizwiz",
        "grounding",
        "vqav2",
        "ocrvqa",
    ]
    assert SCORERS == tuple(KINDS)
    assert [t.scorer for t in COIN_TASKS] == list(KINDS) == [t.scorer for t in benchmark_tasks("minicoin")]
    assert [t.name for t in COIN_TASKS][:2] == ["01-scienceqa", "02-textvqa"]
    with pytest.raises(KeyError, match="unknown task kind"):
        get_kind("mnist")


@pytest.mark.parametrize("key", list(KINDS))
def test_each_kind_is_a_complete_unit(key: str) -> None:
    kind = get_kind(key)
    assert kind.prompt_path.is_file() and load_prompt(key).user  # its ASD prompt, shipped beside it
    rng = np.random.default_rng(0)
    for _ in range(20):  # its generator writes what its own scorers accept, in its native style
        _image, question, answer, meta = kind.generate(rng)
        assert question and format_ok(kind.native_style, answer), (question, answer)
        assert kind.score(answer, answer, meta) == 1.0 and kind.content(answer, answer, meta)
        assert kind.score_reference(answer, answer, meta) == 1.0
        facts = kind.facts(answer, question.split("\n")[0], meta) if kind.facts else None
        assert facts is None or all(isinstance(f, str) and f for f in facts)
