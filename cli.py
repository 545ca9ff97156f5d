"""Run foldkit from a checkout: `python cli.py fold model.onnx -o out.onnx`."""

from foldkit.cli import main

if __name__ == "__main__":
    main()
