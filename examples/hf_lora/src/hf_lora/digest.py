"""Print the digest of a base model's directory, the value of a job's
`base_model_digest`:

    python -m hf_lora.digest DIR_OR_CACHED_ID
"""

from __future__ import annotations

import sys

from hf_lora.base_model import BaseModelError, directory_digest, resolve


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m hf_lora.digest DIR_OR_CACHED_ID")
    try:
        print(directory_digest(resolve(sys.argv[1])))
    except BaseModelError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
