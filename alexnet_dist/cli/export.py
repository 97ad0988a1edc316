"""alexnet-export ckpt_path=CKPT out=DIR: a trained network as files that plain torch and ONNX
runtimes load without alexnet_dist (trained/export.py says what each holds).

  ckpt_path  a checkpoint of alexnet-train
  out        the folder to write model.pt2, model.onnx, preprocess.json and weights.pt into
  data.root  for a checkpoint of an earlier release without its data settings: its shards
"""

import json
import logging
import sys
from pathlib import Path

from ..config import Export
from ..errors import ConfigError
from ..trained import export
from ..trained.inputs import load
from . import key_values, one_line_errors


@one_line_errors
def main(argv=None):
    if (args := key_values(Export, __doc__, sys.argv[1:] if argv is None else argv)) is None:
        return
    if args.ckpt_path is None or args.out is None:
        raise ConfigError("alexnet-export needs ckpt_path=CHECKPOINT and out=FOLDER")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out}: a file, not a folder; name a folder to write the export into")
    trained = load(args.ckpt_path, args.data.root)
    # the ONNX exporter reports optional operator sets it skips (torchvision's) as warnings
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    problems = export.write(trained, out)
    export.report(problems, out)
    written = sorted(name for name, problem in problems.items() if problem is None)
    print(json.dumps({"out": str(out), "written": written, "val_top1": trained.validation.get("val_top1")}))


if __name__ == "__main__":
    main()
