"""alexnet-predict model=DIR_OR_CKPT images=PATH[,PATH...] [top_k=5] [views=1|10]: the classes of
photo files, one JSON line per image, {"image": PATH, "top": [{"class": NAME, "prob": P}, ...]},
best first.

  model   an export's folder (alexnet-export; runs with plain torch) or a checkpoint of alexnet-train
  images  image files or folders (every image file under a folder), comma-separated
  top_k   how many classes per image (default 5)
  views   1: the centre crop; 10: four corners, centre and mirrors (default: what the run validated with)

A photo is read as the model's validation read its stored copy (the same storage, resize and crop).
A file that cannot be read is one error line naming it; the others are still predicted, and the
exit status is then 1.
"""

import json
import sys

from ..config import Predict
from ..errors import ConfigError, DataError
from ..trained.predict import Predictor, photo_files
from . import key_values, one_line_errors


@one_line_errors
def main(argv=None):
    if (args := key_values(Predict, __doc__, sys.argv[1:] if argv is None else argv)) is None:
        return
    if args.model is None or not args.images:
        raise ConfigError("alexnet-predict needs model=EXPORT_FOLDER_OR_CHECKPOINT and images=FILE[,FILE...]")
    predictor = Predictor.open(args.model)
    failed = 0
    for photo in photo_files([item for item in args.images.split(",") if item]):
        try:
            print(json.dumps(predictor.predict(photo, args.top_k, args.views)), flush=True)
        except DataError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr, flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
