//! Card portability: OpenPGP-encrypted card files taken in from another vault or PSP
//! (`cardvault import`), and handed out to the next one under dual control
//! (`cardvault export`).

pub mod openpgp;
pub mod rows;
