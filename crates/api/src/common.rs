//! Types shared by the three custom resources: object references, provider groups,
//! durations and standard Conditions.
//!
//! Everything here is part of the public API surface (`kubectl explain` shows the docs), so
//! names follow Kubernetes conventions (camelCase in YAML, `...Ref` for references).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Regular expression (anchored) of the durations the API accepts: one or more
/// `<number><unit>` groups with units `ms`, `s`, `m`, `h` or `d`, e.g. `90s`, `1h30m`, `90d`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h|d))+$";

/// Regular expression (anchored) of a fully qualified DNS domain name without the trailing dot.
pub const DOMAIN_PATTERN: &str =
    r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)+[a-z]([-a-z0-9]{0,61}[a-z0-9])?$";

/// Regular expression (anchored) of a DNS label (one part of a name).
pub const LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";

/// A reference to an object of another kind in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectRef {
    /// Name of the referenced object, in the namespace of the referring object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A reference to one key of a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the namespace of the referring object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data. When omitted, the documented default key of the field is
    /// used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub key: Option<String>,
}

/// Mailbox-provider groups. Receivers of the same group share reputation systems and limits,
/// so shaping and warm-up limits are kept per group. The group of a destination is decided by
/// its MX host names.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ProviderGroup {
    /// Gmail and Google Workspace (MX under google.com / googlemail.com).
    Gmail,
    /// Yahoo and AOL (MX under yahoodns.net).
    Yahoo,
    /// Outlook.com, Hotmail and Microsoft 365 (MX under outlook.com / protection.outlook.com).
    Microsoft,
    /// NTT Docomo (docomo.ne.jp).
    Docomo,
    /// KDDI au (ezweb.ne.jp, au.com).
    Au,
    /// SoftBank (softbank.ne.jp, i.softbank.jp).
    Softbank,
    /// Every other destination.
    Other,
}

impl ProviderGroup {
    /// Every group, in a stable order.
    pub const ALL: [ProviderGroup; 7] = [
        ProviderGroup::Gmail,
        ProviderGroup::Yahoo,
        ProviderGroup::Microsoft,
        ProviderGroup::Docomo,
        ProviderGroup::Au,
        ProviderGroup::Softbank,
        ProviderGroup::Other,
    ];

    /// The name used in YAML, metrics labels and the coordinator protocol.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderGroup::Gmail => "gmail",
            ProviderGroup::Yahoo => "yahoo",
            ProviderGroup::Microsoft => "microsoft",
            ProviderGroup::Docomo => "docomo",
            ProviderGroup::Au => "au",
            ProviderGroup::Softbank => "softbank",
            ProviderGroup::Other => "other",
        }
    }
}

impl std::fmt::Display for ProviderGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of parsing values that the schema admits as strings.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// The duration text does not match [`DURATION_PATTERN`].
    #[error("invalid duration {text:?}: expected groups like 90s, 15m, 1h30m or 7d")]
    Duration {
        /// The text that failed to parse.
        text: String,
    },
}

/// Parses a duration of the API's form (see [`DURATION_PATTERN`]).
pub fn parse_duration(text: &str) -> Result<Duration, ParseError> {
    let err = || ParseError::Duration {
        text: text.to_owned(),
    };
    if text.is_empty() {
        return Err(err());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err());
        }
        let value: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('d') {
            (Duration::from_secs(86_400), 1)
        } else {
            return Err(err());
        };
        rest = &rest[len..];
        let factor = u32::try_from(value).map_err(|_| err())?;
        total = total
            .checked_add(unit.checked_mul(factor).ok_or_else(err)?)
            .ok_or_else(err)?;
    }
    Ok(total)
}

/// Standard condition status values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The controller cannot tell yet.
    Unknown,
}

impl ConditionStatus {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

/// Sets (adds or updates) the condition of type `type_` in `conditions`.
///
/// As on every Kubernetes object, `lastTransitionTime` changes only when the status flips;
/// reason, message and observedGeneration are refreshed every time.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: Time,
) {
    let new_status = status.as_str();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            if existing.status != new_status {
                existing.status = new_status.to_owned();
                existing.last_transition_time = now;
            }
            existing.reason = reason.to_owned();
            existing.message = message.to_owned();
            existing.observed_generation = observed_generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_owned(),
            status: new_status.to_owned(),
            reason: reason.to_owned(),
            message: message.to_owned(),
            observed_generation,
            last_transition_time: now,
        }),
    }
}

/// Condition type of every mailfleet resource that kstatus reads (Flux, Argo CD and kapp judge
/// health with it): True while the operator is still working towards the spec, so GitOps
/// tools report the object in progress rather than current.
pub const CONDITION_RECONCILING: &str = "Reconciling";

/// Sets [`CONDITION_RECONCILING`]: False with reason `Reconciled` once `done`, else True with
/// the reason and message of what is still under way.
pub fn set_reconciling(
    conditions: &mut Vec<Condition>,
    done: bool,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: Time,
) {
    let (status, reason) = if done {
        (ConditionStatus::False, "Reconciled")
    } else {
        (ConditionStatus::True, reason)
    };
    set_condition(
        conditions,
        CONDITION_RECONCILING,
        status,
        reason,
        message,
        observed_generation,
        now,
    );
}

/// Finds the condition of type `type_`.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "h", "10", "1x", "1h-", "-1h", "99999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn condition_transition_time_changes_only_on_flip() {
        let t0 = Time("2026-01-01T00:00:00Z".parse().unwrap());
        let t1 = Time("2026-01-02T00:00:00Z".parse().unwrap());
        let t2 = Time("2026-01-03T00:00:00Z".parse().unwrap());
        let mut conds = Vec::new();
        set_condition(
            &mut conds,
            "Ready",
            ConditionStatus::False,
            "Pending",
            "a",
            Some(1),
            t0.clone(),
        );
        set_condition(
            &mut conds,
            "Ready",
            ConditionStatus::False,
            "Pending",
            "b",
            Some(2),
            t1,
        );
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, t0);
        assert_eq!(conds[0].message, "b");
        assert_eq!(conds[0].observed_generation, Some(2));
        set_condition(
            &mut conds,
            "Ready",
            ConditionStatus::True,
            "Ok",
            "c",
            Some(2),
            t2.clone(),
        );
        assert_eq!(conds[0].last_transition_time, t2);
        assert_eq!(
            find_condition(&conds, "Ready").map(|c| c.status.as_str()),
            Some("True")
        );
    }
}
