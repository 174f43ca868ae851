//! What a notification says: the templates, amounts for German readers, and
//! the message itself (headers, Message-ID).

use lettre::Message;
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Mailboxes};
use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;

use crate::config::{Invalid, NotifyConfig};
use crate::notify::store::Notification;

/// The compiled templates and addresses of `[notify]`.
pub struct Composer {
    env: Environment<'static>,
    from: Mailbox,
    to: Mailboxes,
    domain: String,
}

/// The names a template may use.
#[derive(Serialize)]
struct Context<'a> {
    outbox_id: i64,
    aggregate_id: &'a str,
    client_reference: &'a str,
    creditor: &'a str,
    amount: String,
    amount_plain: &'a str,
    currency: &'a str,
    previous_amount: Option<String>,
    ticket_id: i64,
    email_id: i64,
    email_message_id: Option<&'a str>,
    email_from: &'a str,
    email_subject: &'a str,
}

impl Composer {
    /// Parses the addresses and compiles the templates; a mistake in either is
    /// a configuration error (exit 78), found by rendering a sample at start-up,
    /// so a typo never becomes a mail with a hole in it.
    pub fn new(config: &NotifyConfig) -> Result<Composer, Invalid> {
        let from: Mailbox = config
            .from
            .parse()
            .map_err(|e| Invalid(format!("invalid configuration: `notify.from`: {e}")))?;
        if config.to.is_empty() {
            return Err(Invalid(
                "invalid configuration: `notify.to` must name at least one recipient".into(),
            ));
        }
        let mut to = Mailboxes::new();
        for address in &config.to {
            let mailbox: Mailbox = address.parse().map_err(|e| {
                Invalid(format!(
                    "invalid configuration: `notify.to` entry {address:?}: {e}"
                ))
            })?;
            to.push(mailbox);
        }
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        for (name, source) in [("subject", &config.subject), ("body", &config.body)] {
            env.add_template_owned(name, source.clone())
                .map_err(|e| Invalid(format!("invalid configuration: `notify.{name}`: {e}")))?;
        }
        let domain = from.email.domain().to_owned();
        let composer = Composer {
            env,
            from,
            to,
            domain,
        };
        composer
            .render(&Notification::sample())
            .map_err(|e| Invalid(format!("invalid configuration: {e}")))?;
        Ok(composer)
    }

    /// The Message-ID of the mail for one outbox id: the same for every resend.
    pub fn message_id(&self, outbox_id: i64) -> String {
        format!("<outboxd-notify-{outbox_id}@{}>", self.domain)
    }

    /// Subject and body, or which template failed and why.
    fn render(&self, n: &Notification) -> Result<(String, String), String> {
        let context = Context {
            outbox_id: n.outbox_id,
            aggregate_id: &n.aggregate_id,
            client_reference: &n.client_reference,
            creditor: &n.creditor_name,
            amount: german_amount(&n.amount, &n.currency),
            amount_plain: &n.amount,
            currency: &n.currency,
            previous_amount: n
                .previous_amount
                .as_deref()
                .map(|a| german_amount(a, n.previous_currency.as_deref().unwrap_or(&n.currency))),
            ticket_id: n.ticket_id,
            email_id: n.email_id,
            email_message_id: n.email_message_id.as_deref(),
            email_from: &n.email_from,
            email_subject: &n.email_subject,
        };
        let render = |name: &str| {
            self.env
                .get_template(name)
                .and_then(|t| t.render(minijinja::value::Serde(&context)))
                .map_err(|e| format!("`notify.{name}`: {e}"))
        };
        // A header is one line: a newline in a field must not end it.
        let subject = render("subject")?.replace(['\r', '\n'], " ");
        Ok((subject.trim().to_owned(), render("body")?))
    }

    /// The mail for one notification; `Err` is permanent (it cannot be built).
    pub fn compose(&self, n: &Notification) -> Result<Message, String> {
        let (subject, body) = self.render(n)?;
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(subject)
            .message_id(Some(self.message_id(n.outbox_id)))
            .date_now()
            .header(ContentType::TEXT_PLAIN);
        for mailbox in self.to.iter() {
            builder = builder.to(mailbox.clone());
        }
        builder
            .body(body)
            .map_err(|e| format!("the mail cannot be built: {e}"))
    }
}

/// An exact decimal amount (`1234.56`) for German readers: `1.234,56 €` for
/// EUR, `1.234,56 USD` otherwise (a no-break space before the unit). Text that
/// is no such decimal is shown as it is, with its currency.
pub fn german_amount(text: &str, currency: &str) -> String {
    let unit = match currency {
        "EUR" => "€",
        other => other,
    };
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 2
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return format!("{text}\u{a0}{unit}");
    }
    let mut grouped = String::with_capacity(int.len() + int.len() / 3);
    for (i, digit) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push('.');
        }
        grouped.push(digit);
    }
    format!("{grouped},{frac:0<2}\u{a0}{unit}")
}

#[cfg(test)]
mod tests {
    use super::german_amount;

    #[test]
    fn amounts_read_as_in_germany() {
        let nb = '\u{a0}';
        for (text, expected) in [
            ("0", "0,00"),
            ("0.5", "0,50"),
            ("7", "7,00"),
            ("999.99", "999,99"),
            ("1000", "1.000,00"),
            ("1234.56", "1.234,56"),
            ("1234567.00", "1.234.567,00"),
            ("123456789012345.67", "123.456.789.012.345,67"),
        ] {
            assert_eq!(
                german_amount(text, "EUR"),
                format!("{expected}{nb}€"),
                "{text}"
            );
        }
        assert_eq!(german_amount("1234.5", "USD"), format!("1.234,50{nb}USD"));
        // Not a decimal: shown as it is.
        assert_eq!(german_amount("-1e3", "EUR"), format!("-1e3{nb}€"));
    }
}
