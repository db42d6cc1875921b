//! A HuJSON reader (JSON with `//` and `/* */` comments and trailing commas, as Tailscale
//! policy files are written) that keeps the line and column of every value, so that a
//! policy error can point at the place to fix.

use std::collections::BTreeMap;
use std::fmt;

/// Where a value starts in the text (1-based, columns counted in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.col)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Spanned>),
    /// Keys keep their own positions; a repeated key is an error, not a silent overwrite.
    Obj(Vec<(String, Pos, Spanned)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Spanned {
    pub pos: Pos,
    pub val: Val,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{pos}: {msg}")]
pub struct SyntaxError {
    pub pos: Pos,
    pub msg: String,
}

/// Deeper nesting than any policy needs; bounds the recursion on hostile input.
const MAX_DEPTH: usize = 64;

pub fn parse(text: &str) -> Result<Spanned, SyntaxError> {
    let mut p = Parser {
        chars: text.chars().collect(),
        i: 0,
        line: 1,
        col: 1,
    };
    p.skip_ws()?;
    let v = p.value(0)?;
    p.skip_ws()?;
    if p.i < p.chars.len() {
        return Err(p.err("unexpected text after the end of the policy"));
    }
    Ok(v)
}

struct Parser {
    chars: Vec<char>,
    i: usize,
    line: usize,
    col: usize,
}

impl Parser {
    fn pos(&self) -> Pos {
        Pos {
            line: self.line,
            col: self.col,
        }
    }

    fn err(&self, msg: impl Into<String>) -> SyntaxError {
        SyntaxError {
            pos: self.pos(),
            msg: msg.into(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.i).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.i += 1;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }

    fn skip_ws(&mut self) -> Result<(), SyntaxError> {
        loop {
            match self.peek() {
                Some(' ' | '\t' | '\n' | '\r' | '\u{feff}') => {
                    self.bump();
                }
                Some('/') => {
                    let start = self.pos();
                    self.bump();
                    match self.bump() {
                        Some('/') => {
                            while let Some(c) = self.bump() {
                                if c == '\n' {
                                    break;
                                }
                            }
                        }
                        Some('*') => loop {
                            match self.bump() {
                                Some('*') if self.peek() == Some('/') => {
                                    self.bump();
                                    break;
                                }
                                Some(_) => {}
                                None => {
                                    return Err(SyntaxError {
                                        pos: start,
                                        msg: "comment opened with /* is never closed".into(),
                                    })
                                }
                            }
                        },
                        _ => {
                            return Err(SyntaxError {
                                pos: start,
                                msg: "a lone '/': comments start with // or /*".into(),
                            })
                        }
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Spanned, SyntaxError> {
        if depth > MAX_DEPTH {
            return Err(self.err(format!("nested more than {MAX_DEPTH} levels deep")));
        }
        let pos = self.pos();
        let val = match self.peek() {
            None => return Err(self.err("unexpected end of the policy; a value is missing")),
            Some('{') => self.object(depth)?,
            Some('[') => self.array(depth)?,
            Some('"') => Val::Str(self.string()?),
            Some('-' | '0'..='9') => self.number()?,
            Some(c) if c.is_ascii_alphabetic() => {
                let mut word = String::new();
                while let Some(c) = self.peek().filter(|c| c.is_ascii_alphanumeric()) {
                    word.push(c);
                    self.bump();
                }
                match word.as_str() {
                    "true" => Val::Bool(true),
                    "false" => Val::Bool(false),
                    "null" => Val::Null,
                    _ => {
                        return Err(SyntaxError {
                            pos,
                            msg: format!("unexpected word {word:?}; strings need double quotes"),
                        })
                    }
                }
            }
            Some(c) => return Err(self.err(format!("unexpected {c:?}; expected a value"))),
        };
        Ok(Spanned { pos, val })
    }

    fn object(&mut self, depth: usize) -> Result<Val, SyntaxError> {
        self.bump();
        let mut members: Vec<(String, Pos, Spanned)> = Vec::new();
        loop {
            self.skip_ws()?;
            match self.peek() {
                Some('}') => {
                    self.bump();
                    return Ok(Val::Obj(members));
                }
                Some('"') => {}
                _ => return Err(self.err("expected a quoted key or '}'")),
            }
            let key_pos = self.pos();
            let key = self.string()?;
            if members.iter().any(|(k, _, _)| *k == key) {
                return Err(SyntaxError {
                    pos: key_pos,
                    msg: format!("key {key:?} appears twice in this object"),
                });
            }
            self.skip_ws()?;
            if self.peek() != Some(':') {
                return Err(self.err(format!("expected ':' after the key {key:?}")));
            }
            self.bump();
            self.skip_ws()?;
            let v = self.value(depth + 1)?;
            members.push((key, key_pos, v));
            self.skip_ws()?;
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some('}') => {}
                _ => return Err(self.err("expected ',' or '}' after a member")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Val, SyntaxError> {
        self.bump();
        let mut items = Vec::new();
        loop {
            self.skip_ws()?;
            if self.peek() == Some(']') {
                self.bump();
                return Ok(Val::Arr(items));
            }
            items.push(self.value(depth + 1)?);
            self.skip_ws()?;
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some(']') => {}
                _ => return Err(self.err("expected ',' or ']' after an element")),
            }
        }
    }

    fn string(&mut self) -> Result<String, SyntaxError> {
        let start = self.pos();
        self.bump();
        let mut s = String::new();
        loop {
            match self.bump() {
                None | Some('\n') => {
                    return Err(SyntaxError {
                        pos: start,
                        msg: "string is not closed on its line".into(),
                    })
                }
                Some('"') => return Ok(s),
                Some('\\') => {
                    let c = match self.bump() {
                        Some('"') => '"',
                        Some('\\') => '\\',
                        Some('/') => '/',
                        Some('b') => '\u{8}',
                        Some('f') => '\u{c}',
                        Some('n') => '\n',
                        Some('r') => '\r',
                        Some('t') => '\t',
                        Some('u') => self.unicode_escape()?,
                        _ => return Err(self.err("unknown escape after '\\'")),
                    };
                    s.push(c);
                }
                Some(c) if (c as u32) < 0x20 => {
                    return Err(self.err("control character inside a string"))
                }
                Some(c) => s.push(c),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, SyntaxError> {
        let mut v = 0;
        for _ in 0..4 {
            let d = self
                .bump()
                .and_then(|c| c.to_digit(16))
                .ok_or_else(|| self.err("\\u needs four hex digits"))?;
            v = v * 16 + d;
        }
        Ok(v)
    }

    fn unicode_escape(&mut self) -> Result<char, SyntaxError> {
        let hi = self.hex4()?;
        let code = if (0xD800..0xDC00).contains(&hi) {
            if self.bump() != Some('\\') || self.bump() != Some('u') {
                return Err(self.err("a high surrogate must be followed by \\u and a low one"));
            }
            let lo = self.hex4()?;
            if !(0xDC00..0xE000).contains(&lo) {
                return Err(self.err("invalid low surrogate"));
            }
            0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
        } else {
            hi
        };
        char::from_u32(code).ok_or_else(|| self.err("\\u escape is not a character"))
    }

    fn number(&mut self) -> Result<Val, SyntaxError> {
        let start = self.pos();
        let mut s = String::new();
        while let Some(c) = self
            .peek()
            .filter(|c| c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E'))
        {
            s.push(c);
            self.bump();
        }
        s.parse::<f64>().map(Val::Num).map_err(|_| SyntaxError {
            pos: start,
            msg: format!("{s:?} is not a number"),
        })
    }
}

impl Spanned {
    /// The JSON kind, for messages ("expected a list, found a string").
    pub fn kind(&self) -> &'static str {
        match self.val {
            Val::Null => "null",
            Val::Bool(_) => "a boolean",
            Val::Num(_) => "a number",
            Val::Str(_) => "a string",
            Val::Arr(_) => "a list",
            Val::Obj(_) => "an object",
        }
    }

    /// Back to plain JSON (for storing sections this server keeps as written).
    pub fn to_json(&self) -> serde_json::Value {
        match &self.val {
            Val::Null => serde_json::Value::Null,
            Val::Bool(b) => serde_json::Value::Bool(*b),
            Val::Num(n) => serde_json::Number::from_f64(*n)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Val::Str(s) => serde_json::Value::String(s.clone()),
            Val::Arr(a) => serde_json::Value::Array(a.iter().map(Spanned::to_json).collect()),
            Val::Obj(o) => serde_json::Value::Object(
                o.iter()
                    .map(|(k, _, v)| (k.clone(), v.to_json()))
                    .collect::<BTreeMap<_, _>>()
                    .into_iter()
                    .collect(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_trailing_commas_are_allowed() {
        let v = parse(
            "// a policy\n{\n  /* groups */ \"a\": [1, 2,], // two\n  \"b\": {\"c\": \"x\\u00e9\",},\n}\n",
        )
        .unwrap();
        let Val::Obj(members) = &v.val else {
            panic!("not an object")
        };
        assert_eq!(members[0].0, "a");
        assert_eq!(members[0].1, Pos { line: 3, col: 16 });
        assert_eq!(members[1].2.to_json(), serde_json::json!({"c": "xé"}));
    }

    #[test]
    fn errors_carry_line_and_column() {
        for (text, line, col, what) in [
            ("{\n  \"a\": [1 2]\n}", 2, 11, "expected ',' or ']'"),
            ("{\"a\": 1, \"a\": 2}", 1, 10, "appears twice"),
            ("{\n /* open", 2, 2, "never closed"),
            ("{\"a\": tru}", 1, 7, "unexpected word"),
            ("{\"a\": \"x\n\"}", 1, 7, "not closed"),
            ("", 1, 1, "unexpected end"),
            ("{} {}", 1, 4, "after the end"),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!((e.pos.line, e.pos.col), (line, col), "{text:?}: {e}");
            assert!(e.msg.contains(what), "{text:?}: {e}");
        }
        assert!(parse(&"[".repeat(1000)).unwrap_err().msg.contains("nested"));
    }
}
