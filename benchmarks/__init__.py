"""Benchmarks against baselines measured in the same run; each writes its figures to ``results/<name>.json``."""


def write_results(path, result: dict) -> None:
    """A benchmark's figures as JSON at ``path`` (and on stdout)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
