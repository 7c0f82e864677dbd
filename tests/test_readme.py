"""The README's five-line example runs as written, on a ViT-like model, at 2x and 1.5x."""

import re
from pathlib import Path

import pytest
import torch
from zoo import ViT

import lemon_fx

README = Path(__file__).parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("width", ["2.0", "1.5"])
def test_five_line_example_grows_a_vit(width, tmp_path, monkeypatch, capsys):
    example = _python_blocks()[0]
    assert len(example.strip().splitlines()) == 5
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = ViT(img_size=32, patch_size=8).eval()
    namespace = {"model": model}
    exec(example.replace("width=1.5", f"width={width}"), namespace)
    printed = capsys.readouterr().out
    assert "residual" in printed and "verification: ok" in printed
    assert (tmp_path / "big.onnx").exists()
    big = namespace["big"]
    # a float32 model: its grown weights are rounded to float32 (the float64 checks of
    # lossless growth are in test_width_zoo.py)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(big(x), model(x), rtol=1e-5, atol=1e-6)


def test_inspect_table_in_readme_is_what_inspect_prints():
    torch.manual_seed(0)
    gm = lemon_fx.trace(ViT(), (torch.randn(2, 3, 16, 16),))
    table = str(lemon_fx.inspect(gm)).split("\n\n")[0]
    table = "\n".join(line for line in table.splitlines() if " blocked by " not in line)
    assert table in README.read_text()


def test_width_and_depth_example_in_readme_is_what_it_prints():
    from zoo import GPT

    torch.manual_seed(0)
    gm = lemon_fx.trace(GPT(), (torch.randint(0, 50, (2, 8)),))
    namespace = {"gm": gm, "lemon_fx": lemon_fx}
    example = next(b for b in _python_blocks() if "depth=" in b)
    big = eval(example.splitlines()[0].split("=", 1)[1].strip(), namespace)
    printed = f"{lemon_fx.inspect(big)}\n{lemon_fx.growth_report(big)}"
    assert printed in README.read_text()
