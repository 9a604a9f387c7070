"""Go's strconv.ParseBool, which upstream applies to its boolean flags, FLANNELD_* variables and the CNI plugin's
FLANNEL_IPMASQ: exactly these spellings, so that a value upstream refuses (`tRuE`, `yes`) is refused here too."""

GO_BOOLS = {v: True for v in ("1", "t", "T", "TRUE", "true", "True")} | {
    v: False for v in ("0", "f", "F", "FALSE", "false", "False")
}


def parse_bool(text: str) -> bool:
    """The boolean Go reads from text; ValueError for anything else."""
    try:
        return GO_BOOLS[text]
    except KeyError:
        raise ValueError(f"invalid syntax: {text!r}") from None
