//! The doctor's findings: one line per check for people, one JSON document for machines, and the
//! exit status they add up to.

use serde_json::json;

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    CannotTell,
    /// Not run because it was not asked for; the reason says how to ask.
    Skipped,
    /// Something worth knowing that a migration does not depend on (half-close not honoured).
    Info,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::CannotTell => "cannot tell",
            Outcome::Skipped => "skipped",
            Outcome::Info => "info",
        }
    }
}

/// The reason of a check that needs a tunnel when check 1 got none.
pub const NO_TUNNEL: &str = "not run: no tunnel to the target (see the connect check)";

/// One check's line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Short stable name (`connect`, ...), the JSON key machines branch on.
    pub check: &'static str,
    pub outcome: Outcome,
    /// What was seen and what to do about it, in a platform engineer's words.
    pub reason: String,
}

impl Finding {
    pub fn new(check: &'static str, outcome: Outcome, reason: impl Into<String>) -> Finding {
        Finding {
            check,
            outcome,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
impl Finding {
    /// Asserts the outcome, and that the reason says each of `words`.
    pub fn expect(&self, outcome: Outcome, words: &[&str]) {
        assert_eq!(self.outcome, outcome, "{}", self.reason);
        for w in words {
            assert!(self.reason.contains(w), "{w:?} not in {:?}", self.reason);
        }
    }
}

/// Everything one run found, in the order the checks ran.
#[derive(Debug, Default)]
pub struct Report {
    /// The proxy URL with its password masked.
    pub proxy: String,
    pub target: String,
    pub findings: Vec<Finding>,
}

impl Report {
    /// 0 when nothing a migration needs failed, 1 otherwise. A check that cannot tell, was
    /// skipped or only informs is not a failure: it is printed, and the operator decides.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.findings.iter().any(|f| f.outcome == Outcome::Fail))
    }

    pub fn text(&self) -> String {
        let mut out = format!("proxy {} target {}\n", self.proxy, self.target);
        for f in &self.findings {
            out.push_str(&format!(
                "{:<12} {:<11} {}\n",
                f.check,
                f.outcome.word(),
                f.reason
            ));
        }
        out.push_str(if self.exit_code() == 0 {
            "verdict: this proxy can carry a migration\n"
        } else {
            "verdict: this proxy cannot carry a migration as it is\n"
        });
        out
    }

    pub fn json(&self) -> String {
        let checks: Vec<_> = self
            .findings
            .iter()
            .map(|f| json!({"check": f.check, "outcome": f.outcome.word(), "reason": f.reason}))
            .collect();
        json!({
            "proxy": self.proxy,
            "target": self.target,
            "ok": self.exit_code() == 0,
            "checks": checks,
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(outcomes: &[Outcome]) -> Report {
        Report {
            proxy: "http://mig:***@127.0.0.1:3128".into(),
            target: "10.0.0.1:443".into(),
            findings: outcomes
                .iter()
                .map(|&o| Finding::new("connect", o, "because \"quoted\""))
                .collect(),
        }
    }

    #[test]
    fn exit_status_is_one_only_on_a_failure() {
        assert_eq!(report(&[Outcome::Pass]).exit_code(), 0);
        assert_eq!(report(&[Outcome::Pass, Outcome::CannotTell]).exit_code(), 0);
        assert_eq!(report(&[Outcome::Skipped, Outcome::Info]).exit_code(), 0);
        assert_eq!(report(&[Outcome::Pass, Outcome::Fail]).exit_code(), 1);
    }

    #[test]
    fn text_has_one_line_per_check_and_a_verdict() {
        let t = report(&[Outcome::Pass, Outcome::CannotTell]).text();
        let lines: Vec<_> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[1].starts_with("connect      pass "));
        assert!(lines[2].contains(" cannot tell "));
        assert_eq!(lines[3], "verdict: this proxy can carry a migration");
    }

    #[test]
    fn json_is_well_formed_and_escaped() {
        let v: serde_json::Value = serde_json::from_str(&report(&[Outcome::Fail]).json()).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["checks"][0]["outcome"], "fail");
        assert_eq!(v["checks"][0]["reason"], "because \"quoted\"");
        assert_eq!(v["proxy"], "http://mig:***@127.0.0.1:3128");
    }
}
