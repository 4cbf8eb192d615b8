"""The oracle itself is checked: tests/original_pipeline.py against the released code's own demo output.

The lip and atr golden cases were made by the oracle, so a defect shared by the project and its oracle
would pass them; the demo case (the released extractor's output, kept in tests/data/cases/demo) cannot
share it.
"""
import numpy as np
from PIL import Image

from conftest import DATA
from original_pipeline import run_original

DEMO = DATA / "cases" / "demo"


def test_oracle_matches_the_released_demo_output(checkpoints):
    assert (DEMO / "dataset").read_text().strip() == "pascal"
    labels, logits = run_original(str(DEMO / "in" / "demo.jpg"), str(checkpoints("pascal")), "pascal")
    expected = np.array(Image.open(DEMO / "expected.png"))
    assert labels.shape == expected.shape == logits.shape[:2]
    agreement = (labels == expected).mean()
    assert agreement >= 0.9999, f"oracle agrees with the released demo output on {agreement:.6%} of pixels"
    sample = np.load(DEMO / "expected_logits_sample.npz")
    got = logits[sample["y"], sample["x"]]
    error = np.linalg.norm(got - sample["logits"]) / np.linalg.norm(sample["logits"])
    assert error < 1e-3, f"oracle logits relative L2 error {error:.2e}"
    print(f"oracle vs released demo: {agreement:.6%} of pixels equal, logits relative L2 error {error:.2e}")
