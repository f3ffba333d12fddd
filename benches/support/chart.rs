//! A grouped bar chart as a standalone SVG, for the benchmark reports in the README.
//! Hand-written on purpose: a few dozen lines instead of a plotting stack with font rendering.

use std::fmt::Write;

/// One chart: groups along the x axis, one bar per series in each group.
pub struct BarChart<'a> {
    /// Title at the top.
    pub title: &'a str,
    /// Label of the value axis.
    pub y_label: &'a str,
    /// Group names (x axis).
    pub groups: Vec<String>,
    /// (series name, one value per group; `None` where not measured).
    pub series: Vec<(String, Vec<Option<f64>>)>,
    /// Log-scale value axis (for values spanning decades).
    pub log: bool,
    /// Draw a dashed reference line at this value (e.g. 1.0 = the kernel).
    pub reference: Option<f64>,
}

const COLORS: [&str; 6] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl BarChart<'_> {
    /// Renders the chart as SVG text.
    pub fn svg(&self) -> String {
        let (w, h) = (960.0_f64, 420.0_f64);
        let (left, right, top, bottom) = (70.0, 20.0, 40.0, 90.0);
        let plot_w = w - left - right;
        let plot_h = h - top - bottom;
        let vals: Vec<f64> = self
            .series
            .iter()
            .flat_map(|(_, v)| v.iter().flatten().copied())
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        let max = vals
            .iter()
            .copied()
            .fold(self.reference.unwrap_or(0.0), f64::max)
            .max(1e-9);
        let min = vals
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
            .min(self.reference.unwrap_or(f64::INFINITY));
        let (lo, hi) = if self.log {
            (
                // One decade below the smallest value, so the shortest bar stays visible.
                (min.max(1e-6)).log10().floor() - 1.0,
                max.log10().ceil().max(min.log10().floor() + 1.0),
            )
        } else {
            (0.0, max * 1.1)
        };
        let scale = |v: f64| -> f64 {
            let t = if self.log {
                (v.max(1e-9).log10() - lo) / (hi - lo)
            } else {
                v / hi
            };
            top + plot_h * (1.0 - t.clamp(0.0, 1.0))
        };
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = write!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = write!(
            s,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
            w / 2.0,
            esc(self.title)
        );
        // Value axis ticks.
        let ticks: Vec<f64> = if self.log {
            (lo as i32..=hi as i32).map(|e| 10f64.powi(e)).collect()
        } else {
            (0..=5).map(|i| hi / 5.0 * i as f64).collect()
        };
        for t in ticks {
            let y = scale(t);
            let _ = write!(
                s,
                r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/>"##,
                w - right
            );
            let _ = write!(
                s,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 6.0,
                y + 4.0,
                fmt_num(t)
            );
        }
        let _ = write!(
            s,
            r#"<text transform="translate(16,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
            top + plot_h / 2.0,
            esc(self.y_label)
        );
        let ng = self.groups.len().max(1) as f64;
        let ns = self.series.len().max(1) as f64;
        let gw = plot_w / ng;
        let bw = gw * 0.8 / ns;
        for (gi, g) in self.groups.iter().enumerate() {
            let gx = left + gw * gi as f64;
            for (si, (_, v)) in self.series.iter().enumerate() {
                let Some(val) = v.get(gi).copied().flatten() else {
                    continue;
                };
                let x = gx + gw * 0.1 + bw * si as f64;
                let y = scale(val);
                let base = if self.log { top + plot_h } else { scale(0.0) };
                let _ = write!(
                    s,
                    r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {}</title></rect>"#,
                    (bw - 1.0).max(1.0),
                    (base - y).max(0.5),
                    COLORS[si % COLORS.len()],
                    esc(g),
                    fmt_num(val)
                );
            }
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="end" transform="rotate(-30 {:.1} {})">{}</text>"#,
                gx + gw / 2.0,
                top + plot_h + 16.0,
                gx + gw / 2.0,
                top + plot_h + 16.0,
                esc(g)
            );
        }
        if let Some(r) = self.reference {
            let y = scale(r);
            let _ = write!(
                s,
                r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#333" stroke-dasharray="5,4"/>"##,
                w - right
            );
        }
        // Legend: one row, each entry as wide as its label.
        let mut x = left;
        for (si, (name, _)) in self.series.iter().enumerate() {
            let y = h - 14.0;
            let _ = write!(
                s,
                r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/>"#,
                y - 10.0,
                COLORS[si % COLORS.len()]
            );
            let _ = write!(s, r#"<text x="{}" y="{y}">{}</text>"#, x + 16.0, esc(name));
            x += 36.0 + 7.0 * name.chars().count() as f64;
        }
        s.push_str("</svg>\n");
        s
    }
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else if v >= 0.01 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}
