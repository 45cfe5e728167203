//! Customer contact details and recurring-payment data, parsed at the edge.
//!
//! A profile is personal data: it is sealed at rest like card data and never logged. Every
//! free-text field is bounded, and refused when it holds something that looks like a card
//! number, so a PAN typed into the wrong field does not end up stored as "metadata".

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::card::contains_pan;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("email is not a valid address")]
    Email,
    #[error("phone must be 4 to 15 digits, optionally with + ( ) - . and spaces")]
    Phone,
    #[error(
        "a text field is empty, too long, holds control characters, or looks like a card number"
    )]
    Text,
    #[error("country must be a two-letter ISO 3166 code")]
    Country,
    #[error("metadata allows at most 50 keys of up to 40 characters and values of up to 500")]
    Metadata,
    #[error("recurring.model must be unscheduled, subscription or installment")]
    RecurringModel,
    #[error("recurring.scheme_transaction_id must be 1-64 letters or digits")]
    SchemeTransactionId,
}

fn text(value: &str, max_chars: usize) -> Result<String, FieldError> {
    let v = value.trim();
    if v.is_empty()
        || v.chars().count() > max_chars
        || v.chars().any(char::is_control)
        || contains_pan(v)
    {
        return Err(FieldError::Text);
    }
    Ok(v.to_owned())
}

fn email(value: &str) -> Result<String, FieldError> {
    let v = value.trim();
    let (local, domain) = v.rsplit_once('@').ok_or(FieldError::Email)?;
    let ok = v.len() <= 254
        && !local.is_empty()
        && !contains_pan(local)
        && local.len() <= 64
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !v.chars().any(|c| c.is_whitespace() || c.is_control())
        && !local.contains('@');
    if !ok {
        return Err(FieldError::Email);
    }
    Ok(v.to_owned())
}

fn phone(value: &str) -> Result<String, FieldError> {
    let v = value.trim();
    let digits = v.bytes().filter(u8::is_ascii_digit).count();
    let allowed = v
        .bytes()
        .all(|b| b.is_ascii_digit() || b" +()-.".contains(&b));
    if !allowed || !(4..=15).contains(&digits) {
        return Err(FieldError::Phone);
    }
    Ok(v.to_owned())
}

#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Address {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line1: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line2: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postal_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
}

impl Address {
    fn parse(self) -> Result<Address, FieldError> {
        let t = |v: Option<String>, max| v.map(|v| text(&v, max)).transpose();
        let country = match self.country {
            None => None,
            Some(c) if c.len() == 2 && c.bytes().all(|b| b.is_ascii_alphabetic()) => {
                Some(c.to_ascii_uppercase())
            }
            Some(_) => return Err(FieldError::Country),
        };
        Ok(Address {
            line1: t(self.line1, 200)?,
            line2: t(self.line2, 200)?,
            city: t(self.city, 100)?,
            state: t(self.state, 100)?,
            postal_code: t(self.postal_code, 20)?,
            country,
        })
    }
}

redacted_debug!(Address, Profile);

/// A customer's contact details, as stored (sealed) and shown.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub email: Option<String>,
    pub name: Option<String>,
    pub phone: Option<String>,
    pub address: Option<Address>,
    pub metadata: BTreeMap<String, String>,
}

impl Profile {
    /// The profile as shown: free text that the current PAN rule would refuse is left out.
    /// Input is screened when it arrives; this catches text stored under an older, narrower
    /// rule (a number split by an en dash, say), so that no reader gets a PAN from it.
    pub fn screened(mut self) -> Profile {
        let keep = |v: &Option<String>| v.as_deref().is_some_and(|v| !contains_pan(v));
        for field in [&mut self.email, &mut self.name] {
            if !keep(field) {
                *field = None;
            }
        }
        if let Some(address) = &mut self.address {
            for field in [
                &mut address.line1,
                &mut address.line2,
                &mut address.city,
                &mut address.state,
                &mut address.postal_code,
            ] {
                if !keep(field) {
                    *field = None;
                }
            }
        }
        self.metadata
            .retain(|k, v| !contains_pan(k) && !contains_pan(v));
        self
    }
}

/// The body of `POST /v1/customers`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NewProfile {
    email: Option<String>,
    name: Option<String>,
    phone: Option<String>,
    address: Option<Address>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

impl NewProfile {
    pub fn parse(self) -> Result<Profile, FieldError> {
        let mut profile = Profile::default();
        ProfilePatch {
            email: self.email.map(Some),
            name: self.name.map(Some),
            phone: self.phone.map(Some),
            address: self.address.map(Some),
            metadata: self
                .metadata
                .into_iter()
                .map(|(k, v)| (k, Some(v)))
                .collect(),
        }
        .apply(&mut profile)?;
        Ok(profile)
    }
}

/// The body of `PATCH /v1/customers/{id}`: an absent field stays, `null` clears it; metadata
/// keys merge, a `null` value removes its key.
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct ProfilePatch {
    #[serde(default, deserialize_with = "present")]
    email: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    name: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    phone: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    address: Option<Option<Address>>,
    #[serde(default)]
    metadata: BTreeMap<String, Option<String>>,
}

/// Distinguishes a field given as `null` (`Some(None)`) from an absent one (`None`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

impl ProfilePatch {
    /// A patch that sets the contact fields given (an import row's).
    pub fn contact(email: Option<&str>, name: Option<&str>, phone: Option<&str>) -> ProfilePatch {
        let set = |v: Option<&str>| v.map(|v| Some(v.to_owned()));
        ProfilePatch {
            email: set(email),
            name: set(name),
            phone: set(phone),
            ..ProfilePatch::default()
        }
    }

    /// Applies the patch; on error `profile` may be partly changed, so apply to a copy.
    pub fn apply(self, profile: &mut Profile) -> Result<(), FieldError> {
        if let Some(v) = self.email {
            profile.email = v.as_deref().map(email).transpose()?;
        }
        if let Some(v) = self.name {
            profile.name = v.as_deref().map(|n| text(n, 200)).transpose()?;
        }
        if let Some(v) = self.phone {
            profile.phone = v.as_deref().map(phone).transpose()?;
        }
        if let Some(v) = self.address {
            profile.address = v.map(Address::parse).transpose()?;
        }
        for (k, v) in self.metadata {
            let key = text(&k, 40).map_err(|_| FieldError::Metadata)?;
            match v {
                None => {
                    profile.metadata.remove(&key);
                }
                Some(v) => {
                    let value = text(&v, 500).map_err(|_| FieldError::Metadata)?;
                    profile.metadata.insert(key, value);
                }
            }
        }
        if profile.metadata.len() > 50 {
            return Err(FieldError::Metadata);
        }
        Ok(())
    }
}

/// What a merchant-initiated payment needs from the first one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recurring {
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme_transaction_id: Option<String>,
}

impl Recurring {
    pub fn parse(self) -> Result<Recurring, FieldError> {
        if !["unscheduled", "subscription", "installment"].contains(&self.model.as_str()) {
            return Err(FieldError::RecurringModel);
        }
        if let Some(id) = &self.scheme_transaction_id {
            if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(FieldError::SchemeTransactionId);
            }
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text stored before the PAN rule took dashes and whitespace runs is left out of views.
    #[test]
    fn views_screen_text_stored_under_an_older_rule() {
        let old = Profile {
            email: Some("ada@example.com".into()),
            name: Some("4111 \u{2013} 1111 \u{2013} 1111 \u{2013} 1111".into()),
            phone: None,
            address: Some(Address {
                line1: Some("12 Analytical Row".into()),
                line2: Some("4111    1111    1111    1111".into()),
                ..Address::default()
            }),
            metadata: [
                ("crm".to_owned(), "c-42".to_owned()),
                ("note".to_owned(), "4111+1111+1111+1111".to_owned()),
            ]
            .into(),
        };
        let shown = old.screened();
        assert_eq!(shown.email.as_deref(), Some("ada@example.com"));
        assert_eq!(shown.name, None);
        let address = shown.address.unwrap();
        assert_eq!(address.line1.as_deref(), Some("12 Analytical Row"));
        assert_eq!(address.line2, None);
        assert_eq!(shown.metadata.len(), 1);
        assert_eq!(shown.metadata["crm"], "c-42");
    }

    #[test]
    fn profile_parsing_table() {
        let parse = |json: &str| {
            serde_json::from_str::<NewProfile>(json)
                .map_err(|_| None)
                .and_then(|p| p.parse().map_err(Some))
        };
        assert!(
            parse(r#"{"email":"ada@example.com","name":"Ada","phone":"+44 20 7946 0958"}"#).is_ok()
        );
        assert!(
            parse(r#"{"address":{"line1":"1 Main St","country":"gb"}}"#)
                .unwrap()
                .address
                .unwrap()
                .country
                .as_deref()
                == Some("GB")
        );
        for (json, err) in [
            (r#"{"email":"not-an-email"}"#, Some(FieldError::Email)),
            (r#"{"email":"a@b"}"#, Some(FieldError::Email)),
            (
                r#"{"email":"4111111111111111@example.com"}"#,
                Some(FieldError::Email),
            ),
            (
                r#"{"name":"4111 1111 1111 1111 123"}"#,
                Some(FieldError::Text),
            ),
            (r#"{"phone":"4111111111111111"}"#, Some(FieldError::Phone)),
            (r#"{"name":"4111 1111 1111 1111"}"#, Some(FieldError::Text)),
            (
                r#"{"metadata":{"note":"4111111111111111"}}"#,
                Some(FieldError::Metadata),
            ),
            (
                r#"{"address":{"country":"GBR"}}"#,
                Some(FieldError::Country),
            ),
            (r#"{"colour":"red"}"#, None),
        ] {
            assert_eq!(parse(json).err(), Some(err), "{json}");
        }
    }

    /// A PAN typed with fullwidth digits, Unicode dashes, `+` or runs of spaces is refused in
    /// every free-text field; text with fewer digits, or digits broken by a letter, is not.
    #[test]
    fn pan_in_any_script_or_separator_is_refused() {
        let profile = |field: &str, value: &str| -> serde_json::Value {
            match field {
                "line1" => serde_json::json!({ "address": { "line1": value } }),
                "metadata" => serde_json::json!({ "metadata": { "note": value } }),
                "email" => serde_json::json!({ "email": format!("{value}@example.com") }),
                _ => serde_json::json!({ field: value }),
            }
        };
        let parse = |json: serde_json::Value| {
            serde_json::from_value::<NewProfile>(json)
                .map_err(|_| None)
                .and_then(|p| p.parse().map_err(Some))
        };
        // "４１１１ １１１１ １１１１ １１１１", as a CJK input method types it.
        let fullwidth: String = "4111 1111 1111 1111"
            .chars()
            .map(|c| match c {
                '0'..='9' => char::from_u32(u32::from(c) + 0xfee0).unwrap(),
                other => other,
            })
            .collect();
        let refused = [
            fullwidth.as_str(),
            "4111 \u{2013} 1111 \u{2013} 1111 \u{2013} 1111",
            "4111\u{2014}1111\u{2014}1111\u{2014}1111",
            "4111 \u{2212} 1111 \u{2212} 1111 \u{2212} 1111",
            "4111+1111+1111+1111",
            "4111    1111    1111    1111",
        ];
        for value in refused {
            for (field, err) in [
                ("name", FieldError::Text),
                ("line1", FieldError::Text),
                ("metadata", FieldError::Metadata),
            ] {
                let got = parse(profile(field, value)).err();
                assert_eq!(got, Some(Some(err)), "{field}: {value:?}");
            }
        }
        // Email local parts take no spaces at all; the other separators are caught there too.
        for local in [
            "4111\u{2013}1111\u{2013}1111\u{2013}1111",
            "4111+1111+1111+1111",
        ] {
            let got = parse(profile("email", local)).err();
            assert_eq!(got, Some(Some(FieldError::Email)), "{local:?}");
        }
        for (field, value) in [
            ("name", "Ada \u{2013} Lovelace"),
            ("name", "\u{5c71}\u{7530} \u{592a}\u{90ce}"),
            ("line1", "Flat 12 \u{2013} 14, 221B Baker Street"),
            ("line1", "4111    1111    111"),
            ("metadata", "order 2026\u{2013}11\u{2013}27, ref. 12345"),
            ("metadata", "4111 + 1111 x 1111 + 1111"),
            ("email", "ada+1234"),
        ] {
            assert!(parse(profile(field, value)).is_ok(), "{field}: {value:?}");
        }
    }

    #[test]
    fn patch_keeps_clears_and_merges() {
        let mut profile = serde_json::from_str::<NewProfile>(
            r#"{"email":"a@example.com","name":"A","metadata":{"x":"1","y":"2"}}"#,
        )
        .unwrap()
        .parse()
        .unwrap();
        let patch: ProfilePatch =
            serde_json::from_str(r#"{"name":null,"metadata":{"x":null,"z":"3"}}"#).unwrap();
        patch.apply(&mut profile).unwrap();
        assert_eq!(profile.email.as_deref(), Some("a@example.com"));
        assert_eq!(profile.name, None);
        assert_eq!(profile.metadata.keys().collect::<Vec<_>>(), ["y", "z"]);
    }
}
