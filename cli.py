"""Run foldkit from a checkout: `python cli.py fold model.onnx -o out.onnx`."""

from foldkit.entry import run

if __name__ == "__main__":
    run()
