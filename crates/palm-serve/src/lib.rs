//! `palm serve`: an OpenAI-compatible API and the feedback web app.
//!
//! Map: `engine` (the batching scheduler that owns the model), `openai` (the OpenAI API types and
//! handlers), `labels` (the labelling, writing, chat and admin API the pages use), `store`
//! (SQLite/PostgreSQL storage and exports), `server` (state, errors, authentication, router,
//! start), `web` (the pages, embedded in the binary).

pub mod engine;
pub mod labels;
pub mod openai;
pub mod server;
pub mod store;
pub mod web;
