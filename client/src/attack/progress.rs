//! Progress bars on stderr (hidden when not wanted, e.g. in tests or with `--json`).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar of `len` steps titled `title`, drawn on stderr if `show`.
pub(crate) fn bar(show: bool, len: u64, title: &str) -> ProgressBar {
    let target = if show {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    let template =
        format!("{title}: {{bar:30.cyan/blue}} {{pos}}/{{len}}  {{msg}}  [{{elapsed_precise}}]");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}
