//! cardvault: a card vault for a payment router.
//!
//! Callers reach it over mutual TLS only; it tokenizes card details into envelope-encrypted
//! records in an embedded sled store, and hands them back once, through detokenization, to
//! callers the policy allows. `ARCHITECTURE.md` has the bird's-eye view; the code map:
//!
//! - [`card`]: `Pan`, `Expiry`, `Cvc` parsed at the edge, redacted and wiped;
//! - `tokens`: object ids and project names;
//! - `customer`: customer contact details and recurring data, parsed at the edge;
//! - [`crypto`]: envelope encryption, the KEK, and its custody in Shamir shares;
//! - `store`: sled trees, record encoding, group commit;
//! - `policy`: identities and permissions, the only place that grants;
//! - `vault`: the domain service (no HTTP), with the key hierarchy at run time (sealing,
//!   rotation, re-encryption, rekey);
//! - `audit`: audit events;
//! - `api`: HTTP handlers and the one error mapping;
//! - [`forward`]: forwarding to PSPs (receivers, placeholders, egress checks, masking);
//! - `portability`: OpenPGP card files in (import) and out (export), and their rows;
//! - `tls`, [`server`]: rustls configuration and the assembled daemon;
//! - [`config`], [`dev`], [`pki`], [`commands`]: what the binary needs;
//! - [`bench`]: the load generator behind `cardvault bench`;
//! - [`client`]: the operator side of the admin API (`unseal`, `keys ...`);
//! - [`hardening`]: no core dumps, locked memory, a warning for root.

/// `Debug` for types that hold personal or card data: prints only the type name, so a stray
/// `{:?}` in a log line or a panic cannot leak what they hold.
macro_rules! redacted_debug {
    ($($t:ty),* $(,)?) => {
        $(impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(concat!(stringify!($t), "(<redacted>)"))
            }
        })*
    };
}

pub mod bench;
pub mod card;
pub mod check;
pub mod client;
pub mod commands;
pub mod config;
pub mod dev;
pub mod forward;
pub mod hardening;
pub mod metrics;
pub mod pki;
pub mod server;
pub mod stub_psp;
pub mod throwaway;

mod api;
mod audit;
pub mod crypto;
mod customer;
mod limits;
mod policy;
mod portability;
mod store;
mod tls;
mod tokens;
mod vault;

/// Invariants of the code base, checked by reading the source tree.
#[cfg(test)]
mod tidy;

#[cfg(test)]
mod fuzz;
