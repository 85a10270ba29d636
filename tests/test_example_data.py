import json
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"


def test_example_data_loads_as_imagefolder():
    from datasets import load_dataset

    ds = load_dataset("imagefolder", data_dir=str(DATA), split="train")
    rows = [json.loads(line) for line in (DATA / "metadata.jsonl").read_text().splitlines()]
    assert ds.column_names == ["image", "text"]
    assert list(ds["text"]) == [row["text"] for row in rows]
    for image in ds["image"]:
        assert image.mode == "RGB" and max(image.size) == 256
    assert sum(f.stat().st_size for f in DATA.iterdir()) < 1_000_000
