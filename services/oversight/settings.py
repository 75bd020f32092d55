"""The oversight service's one Settings: every setting is FRS_OVERSIGHT_<NAME>, a threshold
per rule among them."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from schemas.catalog import OVERSIGHT_APP_ID
from schemas.types import Purpose
from services.kit.settings import ServiceSettings
from services.oversight.handlers import Limits

HOUR_S = 3600
DAY_S = 24 * HOUR_S


class OversightSettings(ServiceSettings):
    """Every setting is FRS_OVERSIGHT_<NAME> (e.g. FRS_OVERSIGHT_SEARCHES_PER_HOUR)."""

    model_config = SettingsConfigDict(env_prefix="FRS_OVERSIGHT_", frozen=True,
                                      extra="ignore", populate_by_name=True)
    service: str = "oversight"
    metrics_port: int = Field(9305, description="Port for /metrics.")
    app_id: str = Field(OVERSIGHT_APP_ID, description="faust app id: consumer group and the "
                        "prefix of its changelog and repartition topics (ACLs grant it).")
    # Rules: a threshold each; a count over it is a hit.
    searches_per_hour: int = Field(20, ge=0, description="Searches per agent per clock "
                                   "hour (tumbling window) over this are a hit.")
    searches_per_day: int = Field(100, ge=0, description="Searches per agent in any 24 h "
                                  "(hopping window, 1 h step) over this are a hit.")
    distinct_cases: int = Field(5, ge=0, description="Distinct cases one agent searches in "
                                "a window over this are a hit.")
    distinct_cases_window_s: int = Field(DAY_S, ge=60, description="That window (hopping, "
                                         "step a twenty-fourth of it), seconds.")
    shopping_window_s: int = Field(3 * DAY_S, ge=60, description="An original image "
                                   "resubmitted under another purpose, case or nexus this "
                                   "long after a PolicyDenied of it is a hit, seconds.")
    provider_fanout: dict[Purpose, int] = Field(
        default_factory=lambda: {p: 3 for p in Purpose},
        description='Providers one probe image may be sent to per purpose in a day, JSON '
                    '{"purpose": n}; more is a hit (purposes not named: provider_fanout_default).')
    provider_fanout_default: int = Field(3, ge=1, description="Providers per image per day "
                                         "for a purpose provider_fanout does not name.")
    exigent_per_week: int = Field(3, ge=0, description="Exigent clearances per agent per "
                                  "week (tumbling) over this are a hit.")
    review_deadline_s: int = Field(3 * DAY_S, ge=1, description="A candidate list that needs "
                                   "examiner review and has none this long after the request "
                                   "is a hit, seconds.")
    deletion_overdue_share: float = Field(0.1, ge=0, le=1, description="Per provider, "
                                          "overdue deletion receipts over this share of its "
                                          "sends in a day (by send time) are a hit.")
    deletion_overdue_min: int = Field(3, ge=1, description="...and at least this many.")
    # faust: a dead worker's partitions move in seconds (defaults wait up to a minute).
    session_timeout_s: float = Field(6.0, gt=0, description="Consumer session timeout.")
    heartbeat_interval_s: float = Field(1.0, gt=0, description="Consumer heartbeat period.")
    rebalance_timeout_s: float = Field(10.0, gt=0, description="Consumer rebalance timeout.")
    tick_s: float = Field(1.0, gt=0, description="How often review deadlines are checked.")
    review_quiet_s: float = Field(
        30.0, ge=0, description="A results partition is judged by the wall clock only after "
        "no record came from it this long (before: by its latest event time), seconds.")

    def limits(self) -> Limits:
        return Limits(
            searches_per_hour=self.searches_per_hour, searches_per_day=self.searches_per_day,
            distinct_cases=self.distinct_cases,
            distinct_cases_window_s=self.distinct_cases_window_s,
            shopping_window_s=self.shopping_window_s,
            provider_fanout={str(k): v for k, v in self.provider_fanout.items()},
            provider_fanout_default=self.provider_fanout_default,
            exigent_per_week=self.exigent_per_week, review_deadline_s=self.review_deadline_s,
            deletion_overdue_share=self.deletion_overdue_share,
            deletion_overdue_min=self.deletion_overdue_min,
        )
