"""Row validation shared by every parser: ids and times normalised, each row's first failing check counted as its
drop reason (or raised, naming file, line and field, with ``on_bad_rows=error``), and the item text of catalogues.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from eimf.data.parsers.spec import MAX_EXAMPLES, CatalogueSpec, DataError, Drops, InteractionSpec, check_policy


def _as_series(values) -> pd.Series:
    return values if isinstance(values, pd.Series) else pd.Series(values, dtype=object)


def as_strings(values) -> tuple:
    """-> (stripped strings as object ndarray, missing mask). Numbers become their text; integral floats lose ``.0``."""
    s = _as_series(values)
    s = s.reset_index(drop=True)
    if pd.api.types.is_bool_dtype(s.dtype):
        s = s.astype(object)
    if pd.api.types.is_integer_dtype(s.dtype):
        missing = s.isna().to_numpy()
        out = s.astype(str).to_numpy(dtype=object)
        return out, missing
    if pd.api.types.is_float_dtype(s.dtype):
        f = s.to_numpy(dtype="float64", na_value=np.nan)
        missing = np.isnan(f)
        integral = ~missing & np.isfinite(f) & (f == np.floor(f)) & (np.abs(f) < 2**63)
        out = s.astype(str).to_numpy(dtype=object)
        if integral.any():
            out[integral] = f[integral].astype(np.int64).astype(str)
        return out, missing
    if s.dtype == object:
        try:  # all strings (or None): convert in C
            s = pd.Series(pa.array(s.to_numpy(), type=pa.string(), from_pandas=True).to_pandas(types_mapper=None),
                          dtype="str")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            s = None
    if s is None:
        s = _as_series(values).reset_index(drop=True)
        # JSON values may be numbers, strings, lists, None
        conv = [
            None if v is None or (isinstance(v, float) and np.isnan(v))
            else (str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
            for v in s.tolist()
        ]
        s = pd.Series(conv, dtype="str")
    else:
        s = s.astype("str")
    s = s.str.strip()
    missing = (s.isna() | (s == "")).to_numpy()
    return s.to_numpy(dtype=object, na_value=None), missing


def int_ids(strs: np.ndarray, missing: np.ndarray) -> tuple:
    """Numeric ids: -> (normalised strings, bad mask among the non-missing)."""
    out = strs.copy()
    bad = np.zeros(len(strs), dtype=bool)
    idx = np.flatnonzero(~missing)
    if len(idx) == 0:
        return out, bad
    arr = pa.array(strs[idx], type=pa.string())
    try:  # fast path: every id is a plain integer
        ints = pc.cast(arr, pa.int64())
        out[idx] = pc.cast(ints, pa.string()).to_numpy(zero_copy_only=False)
        return out, bad
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    num = pd.to_numeric(pd.Series(strs[idx], dtype="str"), errors="coerce")
    if pd.api.types.is_integer_dtype(num.dtype):
        out[idx] = num.astype("int64").astype(str).to_numpy(dtype=object)
        return out, bad
    f = num.to_numpy(dtype="float64", na_value=np.nan)
    ok = np.isfinite(f) & (f == np.floor(f)) & (np.abs(f) < 2**53)
    bad[idx[~ok]] = True
    good = idx[ok]
    out[good] = f[ok].astype(np.int64).astype(str)
    return out, bad


def _times(values, missing_hint: Optional[np.ndarray] = None) -> tuple:
    """-> (float64 times, missing mask, non-numeric mask). ISO-8601 strings are accepted if no value is a number."""
    s = _as_series(values).reset_index(drop=True)
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        missing = s.isna().to_numpy()
        return _epoch_seconds(s), missing, np.zeros(len(s), dtype=bool)
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        f = s.to_numpy(dtype="float64", na_value=np.nan)
        missing = np.isnan(f)
        return f, missing, np.zeros(len(s), dtype=bool) | (~missing & ~np.isfinite(f))
    strs, missing = as_strings(s)
    f = np.full(len(strs), np.nan)
    idx = np.flatnonzero(~missing)
    if len(idx):
        try:  # fast path: every time is a plain number
            num = pc.cast(pa.array(strs[idx], type=pa.string()), pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            num = pd.to_numeric(pd.Series(strs[idx], dtype="str"), errors="coerce").to_numpy(
                dtype="float64", na_value=np.nan)
        if not np.isfinite(num).any():
            dt = pd.to_datetime(pd.Series(strs[idx], dtype="str"), errors="coerce", utc=True, format="ISO8601")
            ok = dt.notna().to_numpy()
            num = np.full(len(idx), np.nan)
            num[ok] = _epoch_seconds(dt[ok])
        f[idx] = num
    bad = ~missing & ~np.isfinite(f)
    return f, missing, bad


def _epoch_seconds(s: pd.Series) -> np.ndarray:
    """datetime Series (any unit, naive = UTC) -> float seconds since 1970 (NaN where missing)."""
    if s.dt.tz is not None:
        s = s.dt.tz_convert("UTC").dt.tz_localize(None)
    delta = (s - pd.Timestamp(0)) / pd.Timedelta(seconds=1)
    return delta.to_numpy(dtype="float64", na_value=np.nan)


def _ts_array(f: np.ndarray) -> np.ndarray:
    if len(f) and np.all(f == np.floor(f)) and np.all(np.abs(f) < 2**62):
        return f.astype(np.int64)
    return f.astype(np.float64)


def _fmt(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


class Checker:
    """Assigns each row its first failing check; raises on the first bad row in error mode."""

    def __init__(self, path: str, n: int, lines: np.ndarray, policy: str, unit: str = "line"):
        self.path, self.n, self.lines, self.policy, self.unit = path, n, lines, policy, unit
        self.code = np.zeros(n, dtype=np.int16)
        self.checks: List[tuple] = []  # (reason, field, problem, values)

    def check(self, mask: np.ndarray, reason: str, fieldname: str, problem: str, values=None) -> None:
        mask = np.asarray(mask, dtype=bool)
        self.checks.append((reason, fieldname, problem, values))
        k = len(self.checks)
        self.code[(self.code == 0) & mask] = k

    def finish(self) -> tuple:
        """-> (keep mask, Drops)."""
        drops = Drops()
        bad = np.flatnonzero(self.code)
        if len(bad) and self.policy == "error":
            i = bad[0]
            reason, fieldname, problem, values = self.checks[self.code[i] - 1]
            value = "" if values is None else f": {_fmt(values[i])}"
            what = "the row" if fieldname == "*" else f"field {fieldname!r}"
            raise DataError(f"{self.path}, {self.unit} {int(self.lines[i])}: {what} {problem}{value} "
                            f"({reason}; use data.on_bad_rows=drop to drop and count such rows)")
        counts = np.bincount(self.code, minlength=len(self.checks) + 1)
        for k, (reason, fieldname, _, _) in enumerate(self.checks, start=1):
            if counts[k]:
                where = np.flatnonzero(self.code == k)[:MAX_EXAMPLES]
                drops.add(reason, counts[k], [f"{self.path}:{int(self.lines[i])} ({fieldname})" for i in where])
        return self.code == 0, drops


def validate_interactions(path: str, user, item, ts, lines: np.ndarray, spec: InteractionSpec,
                          extra_bad: Optional[np.ndarray] = None, unit: str = "line",
                          extra_reason: str = "wrong_field_count",
                          user_field: Optional[str] = None, item_field: Optional[str] = None) -> tuple:
    n = len(lines)
    ufield, ifield = user_field or spec.user_col, item_field or spec.item_col
    chk = Checker(path, n, lines, spec.on_bad_rows, unit)
    if extra_bad is not None:
        problem = "is not a JSON object" if extra_reason == "invalid_json" else "has more fields than the header"
        chk.check(extra_bad, extra_reason, "*", problem)
    users, u_missing = as_strings(user)
    items, i_missing = as_strings(item)
    chk.check(u_missing, "missing_user", ufield, "is missing")
    chk.check(i_missing, "missing_item", ifield, "is missing")
    if ts is not None:
        t, t_missing, t_bad = _times(ts)
        chk.check(t_missing, "missing_time", spec.time_col, "is missing")
    if spec.numeric_ids:
        users, u_bad = int_ids(users, u_missing)
        items, i_bad = int_ids(items, i_missing)
        chk.check(u_bad, "non_numeric_user", ufield, "is not an integer id", users)
        chk.check(i_bad, "non_numeric_item", ifield, "is not an integer id", items)
    if ts is not None:
        chk.check(t_bad, "non_numeric_time", spec.time_col, "is not a number (or ISO-8601 time)",
                  as_strings(ts)[0])
    keep, drops = chk.finish()
    rows = np.flatnonzero(keep).astype(np.int64)
    table = pd.DataFrame({
        "user": pd.array(users[keep], dtype="str"),
        "item": pd.array(items[keep], dtype="str"),
        "ts": _ts_array(t[keep]) if ts is not None else rows.copy(),
        "row": rows,
        "line": np.asarray(lines, dtype=np.int64)[keep],
    })
    return table, drops



# ------------------------------------------------------------------------------------------- catalogues
def _text_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and np.isnan(v):
        return ""
    if isinstance(v, (list, tuple, np.ndarray)):
        flat, seen = [], set()
        stack = list(v)[::-1]
        while stack:
            x = stack.pop()
            if isinstance(x, (list, tuple, np.ndarray)):
                stack.extend(list(x)[::-1])
            elif x is not None and str(x).strip() and str(x).strip() not in seen:
                seen.add(str(x).strip())
                flat.append(str(x).strip())
        return ", ".join(flat)
    return str(v).strip()


def join_text(parts: Sequence) -> str:
    """Non-empty parts joined with ``" | "`` (lists inside a part with ``", "``)."""
    return " | ".join(t for t in (_text_value(p) for p in parts) if t)


def catalogue_table(path: str, ids, texts: List[str], lines: np.ndarray, spec: CatalogueSpec,
                    extra_bad: Optional[np.ndarray] = None, unit: str = "line",
                    extra_reason: str = "wrong_field_count") -> tuple:
    check_policy(spec.on_bad_rows)
    chk = Checker(path, len(lines), lines, spec.on_bad_rows, unit)
    if extra_bad is not None:
        chk.check(extra_bad, extra_reason, "*", "is malformed")
    strs, missing = as_strings(ids)
    chk.check(missing, "missing_item", spec.item_col, "is missing")
    if spec.numeric_ids:
        strs, bad = int_ids(strs, missing)
        chk.check(bad, "non_numeric_item", spec.item_col, "is not an integer id", strs)
    ok_so_far = chk.code == 0
    dup = np.zeros(len(lines), dtype=bool)
    if ok_so_far.any():
        idx = np.flatnonzero(ok_so_far)
        dup[idx] = pd.Series(strs[idx], dtype=object).duplicated(keep="first").to_numpy()
    chk.check(dup, "duplicate_item", spec.item_col, "repeats an item id already listed", strs)
    keep, drops = chk.finish()
    table = pd.DataFrame({
        "item": pd.array(strs[keep], dtype="str"),
        "text": pd.array(np.asarray(texts, dtype=object)[keep], dtype="str"),
        "line": np.asarray(lines, dtype=np.int64)[keep],
    })
    return table, drops

