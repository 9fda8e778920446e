//! What a streamed answer may show yet. The strategies accept whole segments, and the answer is cut
//! afterwards at the first stop string and at `max_chars`; a stream must never show text that the
//! final answer drops. So a tail that could be the start of a stop string is held back, nothing past
//! a stop string or past `max_chars` is released, and the released text is split into reasoning and
//! answer ([`ensemble_proto::reasoning::StreamSplit`]).

use ensemble_proto::reasoning::StreamSplit;

/// Released text of one piece: (reasoning, answer).
pub type Released = (String, String);

/// The answer as streamed so far.
#[derive(Debug)]
pub struct StreamText {
    raw: String,
    released: usize,
    stop: Vec<String>,
    max_chars: usize,
    split: StreamSplit,
    ended: bool,
}

impl StreamText {
    /// A stream of an answer cut at `stop` and `max_chars`.
    pub fn new(stop: Vec<String>, max_chars: usize) -> Self {
        Self {
            raw: String::new(),
            released: 0,
            stop,
            max_chars,
            split: StreamSplit::default(),
            ended: false,
        }
    }

    /// Whether any text came in.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Byte length of `raw` that the final answer is sure to keep (`hold`: keep back a possible stop
    /// prefix).
    fn safe_len(&self, hold: bool) -> usize {
        let mut end = self.raw.len();
        if let Some((i, _)) = self.raw.char_indices().nth(self.max_chars) {
            end = end.min(i);
        }
        if let Some(cut) = self.stop.iter().filter_map(|s| self.raw.find(s.as_str())).min() {
            return end.min(cut);
        }
        if hold {
            let longest = self
                .stop
                .iter()
                .flat_map(|s| s.char_indices().skip(1).map(|(i, _)| &s[..i]))
                .filter(|p| self.raw.ends_with(p))
                .map(str::len)
                .max()
                .unwrap_or(0);
            end = end.min(self.raw.len() - longest);
        }
        end
    }

    fn release(&mut self, hold: bool) -> Released {
        let end = self.safe_len(hold).max(self.released);
        let piece = &self.raw[self.released..end];
        self.released = end;
        self.split.push(piece)
    }

    /// Text the strategy accepted; returns what may be shown now.
    pub fn push(&mut self, text: &str) -> Released {
        if self.ended {
            return Released::default();
        }
        self.raw.push_str(text);
        self.release(true)
    }

    /// The answer is complete: releases the rest of what the final answer keeps.
    pub fn finish(&mut self) -> Released {
        if self.ended {
            return Released::default();
        }
        let (mut r, mut a) = self.release(false);
        let (r2, a2) = self.split.finish();
        r.push_str(&r2);
        a.push_str(&a2);
        self.ended = true;
        (r, a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&str], stop: &[&str], max_chars: usize) -> (Vec<Released>, Released) {
        let mut s = StreamText::new(stop.iter().map(|s| s.to_string()).collect(), max_chars);
        let shown: Vec<Released> = pieces.iter().map(|p| s.push(p)).collect();
        (shown, s.finish())
    }

    fn total(shown: &[Released], last: &Released) -> Released {
        let mut t = Released::default();
        for (r, a) in shown.iter().chain([last]) {
            t.0 += r;
            t.1 += a;
        }
        t
    }

    #[test]
    fn nothing_past_a_stop_string_is_shown() {
        let (shown, last) = run(&["The Tarn", " flows\nQ", ": next"], &["\nQ:"], 100);
        assert_eq!(shown[0].1, "The Tarn");
        // "\nQ" could be the start of the stop string: held back, then dropped.
        assert_eq!(shown[1].1, " flows");
        assert_eq!(total(&shown, &last).1, "The Tarn flows");
    }

    #[test]
    fn the_length_limit_and_reasoning_are_applied_while_streaming() {
        let (shown, last) = run(&["<think>12", "+3=51</think>", "15 and more"], &[], 25);
        assert_eq!(shown[0], ("12".to_owned(), String::new()));
        assert_eq!(total(&shown, &last), ("12+3=51".to_owned(), "15 ".to_owned()));
        let (shown, last) = run(&["abc"], &[], 10);
        assert_eq!((shown[0].1.as_str(), last.1.as_str()), ("abc", ""));
    }
}
