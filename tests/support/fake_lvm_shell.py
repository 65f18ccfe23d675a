"""A stand-in for ``lvm shell`` speaking the protocol ELV reads (csi.backend.lvm.shell).

Usage: fake_lvm_shell.py RECORD: appends its pid, then every input line it
gets, to RECORD. The first word of a line picks what it does:

* ``vgs``/``lvs`` NAMES...: a report (``vgs``: one row per name; ``lvs``: no
  LVs); a name starting with ``missing`` makes it exit 5, with "not found"
  among the document's errors;
* ``hang``: never answers; ``die``: exits at once; ``garbage``: writes text
  that is not JSON; ``nostatus``: a document without the shell's status;
* ``slow``: answers after a second, then records ``done slow``;
* anything else (a change): success, or status 5 for a name starting with
  ``missing``.
"""

from __future__ import annotations

import json
import os
import sys
import time


def status(command: str, ret: int) -> dict[str, str]:
    return {"log_type": "status", "log_context": "shell", "log_object_name": command, "log_ret_code": str(ret)}


def main() -> None:
    record = sys.argv[1]
    out = os.fdopen(int(os.environ["LVM_REPORT_FD"]), "w")
    profile = os.path.join(os.environ["LVM_SYSTEM_DIR"], "profile", os.environ["LVM_COMMAND_PROFILE"] + ".profile")
    with open(record, "a", encoding="utf-8") as f:
        f.write(f"pid {os.getpid()} {os.path.exists(profile)}\n")
    for line in sys.stdin:
        with open(record, "a", encoding="utf-8") as f:
            f.write(line)
        words = line.split()
        command, names = words[0], [w for w in words[1:] if not w.startswith("-")]
        if command == "hang":
            time.sleep(3600)
        if command == "slow":
            time.sleep(1.0)
        if command == "die":
            sys.exit(3)
        if command == "garbage":
            out.write("lvm> oops\n")
            out.flush()
            continue
        if command == "nostatus":
            doc: dict[str, object] = {"log": []}
        else:
            missing = [n for n in names if n.startswith("missing")]
            key = "vg" if command == "vgs" else "lv"
            rows = [{"vg_name": n} for n in names if n not in missing] if key == "vg" else []
            errors = [
                {"log_type": "error", "log_context": "processing", "log_message": f'Volume group "{n}" not found'}
                for n in missing
            ]
            doc = {"report": [{key: rows}], "log": [*errors, status(command, 5 if missing else 1)]}
        # Written in two pieces, as LVM's own output may reach the reader.
        text = json.dumps(doc, indent=2)
        out.write(text[:7])
        out.flush()
        out.write(text[7:] + "\n")
        out.flush()
        if command == "slow":
            with open(record, "a", encoding="utf-8") as f:
                f.write("done slow\n")


if __name__ == "__main__":
    main()
