"""VQAv2: counting, colours and yes/no about a scene, a short answer."""

from __future__ import annotations

import numpy as np

from sefe_core.kinds import TaskKind, register
from sefe_core.scenes import SHAPES, Sample, picture_size, random_scene, render
from sefe_core.scorers import exact, exact_reference, short_content
from sefe_core.styles import SHORT_SUFFIX


# --------------------------------------------------------------------------------------------
# MiniCoIN
# --------------------------------------------------------------------------------------------
def generate(rng: np.random.Generator) -> Sample:
    size = picture_size(rng)
    n = int(rng.integers(1, 5))
    objs = random_scene(rng, n, size)
    kind = int(rng.integers(3))
    if kind == 0:
        q, ans = "How many objects are there?", str(n)
    elif kind == 1:
        o = objs[int(rng.integers(n))]
        q, ans = f"What color is the {o.shape}?", o.color
    else:
        absent = [s for s in SHAPES if all(o.shape != s for o in objs)]
        shape = (
            objs[int(rng.integers(n))].shape if rng.random() < 0.5 else absent[int(rng.integers(len(absent)))]
        )
        present = any(o.shape == shape for o in objs)
        q, ans = f"Is there a {shape}?", "yes" if present else "no"
    meta = {"objects": [o.as_meta(size) for o in objs], "image_size": [size, size]}
    return render(objs, size), f"{q}\n{SHORT_SUFFIX}", ans, meta


KIND = register(
    TaskKind(
        key="vqav2",
        coin_name="VQAv2",
        native_style="short",
        max_new_tokens=6,
        score=exact,
        score_reference=exact_reference,
        content=short_content,
        generate=generate,
    )
)
