"""Calendar features of timestamps, exactly as iTransformer's `utils/timefeatures.py` (`embed=timeF`).

GluonTS-style features, each scaled to [-0.5, 0.5]; the set depends on the frequency string. Computed
from numpy datetime64, without pandas.
"""
from __future__ import annotations

import re

import numpy as np

from data.errors import DataError


def _calendar(dates: np.ndarray) -> dict[str, np.ndarray]:
  days = dates.astype("datetime64[D]")
  seconds_of_day = (dates - days).astype("timedelta64[s]").astype(np.int64)
  months = days.astype("datetime64[M]")
  day_of_week = (days.astype(np.int64) + 3) % 7   # 1970-01-01 was a Thursday; Monday = 0 as in pandas
  # ISO week (pandas isocalendar().week): the week's number is that of its Thursday in its year.
  thursday = days + (3 - day_of_week).astype("timedelta64[D]")
  iso_week = (thursday - thursday.astype("datetime64[Y]")).astype(np.int64) // 7 + 1
  return {
      "second": seconds_of_day % 60,
      "minute": seconds_of_day // 60 % 60,
      "hour": seconds_of_day // 3600,
      "day_of_week": day_of_week,
      "day_of_month": (days - months).astype(np.int64) + 1,
      "day_of_year": (days - days.astype("datetime64[Y]")).astype(np.int64) + 1,
      "month": months.astype(np.int64) % 12 + 1,
      "week_of_year": iso_week,
  }


# name -> (calendar field, offset, divisor): feature = (field - offset) / divisor - 0.5
_FEATURES = {
    "SecondOfMinute": ("second", 0, 59),
    "MinuteOfHour": ("minute", 0, 59),
    "HourOfDay": ("hour", 0, 23),
    "DayOfWeek": ("day_of_week", 0, 6),
    "DayOfMonth": ("day_of_month", 1, 30),
    "DayOfYear": ("day_of_year", 1, 365),
    "MonthOfYear": ("month", 1, 11),
    "WeekOfYear": ("week_of_year", 1, 52),
}
_DAILY = ("DayOfWeek", "DayOfMonth", "DayOfYear")
# `features_by_offsets` of the official code, keyed by the pandas offset alias (lower case).
_FEATURES_BY_FREQ = {
    "y": (), "a": (), "ye": (),
    "q": ("MonthOfYear",), "qe": ("MonthOfYear",), "m": ("MonthOfYear",), "me": ("MonthOfYear",),
    "w": ("DayOfMonth", "WeekOfYear"),
    "d": _DAILY, "b": _DAILY,
    "h": ("HourOfDay", *_DAILY),
    "t": ("MinuteOfHour", "HourOfDay", *_DAILY), "min": ("MinuteOfHour", "HourOfDay", *_DAILY),
    "s": ("SecondOfMinute", "MinuteOfHour", "HourOfDay", *_DAILY),
}


def feature_names(freq: str) -> tuple[str, ...]:
  """The features of a frequency string such as 'h', '15min', 't', 'd', 'w'."""
  match = re.fullmatch(r"\d*([a-z]+)(?:-\w+)?", freq.strip().lower())   # '15min' -> 'min', 'w-sun' -> 'w'
  if match is None or match.group(1) not in _FEATURES_BY_FREQ:
    raise DataError(f"unsupported time-feature frequency {freq!r}; expected one of "
                    f"{', '.join(_FEATURES_BY_FREQ)} (optionally with a multiple, e.g. '15min')")
  return _FEATURES_BY_FREQ[match.group(1)]


def time_features(dates: np.ndarray, freq: str = "h") -> np.ndarray:
  """[rows] datetime64 -> [rows, num_features] float64 (the official `data_stamp`)."""
  calendar = _calendar(np.asarray(dates, "datetime64[s]"))
  columns = []
  for name in feature_names(freq):
    field, offset, divisor = _FEATURES[name]
    columns.append((calendar[field] - offset) / divisor - 0.5)
  return np.stack(columns, axis=-1) if columns else np.zeros((len(dates), 0))
