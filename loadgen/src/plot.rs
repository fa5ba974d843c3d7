//! `plot --dir DIR`: one SVG per curve of a `scripts/bench-curves` run (instances.svg,
//! rate.svg, backlog.svg, idle.svg) and its tables as Markdown (printed, and written to
//! DIR/curves.md). The numbers come from [`crate::curves`].

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use plotters::coord::ranged1d::{
    AsRangedCoord, DefaultFormatting, KeyPointHint, Ranged, ValueFormatter,
};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

use crate::curves::{load_curve, num, saturated, Point, SaturationRule, CURVES};

#[derive(Args)]
pub struct PlotArgs {
    /// A curves run directory (bench-results/<UTC>-curves).
    #[arg(long)]
    pub dir: PathBuf,
    /// The sweep's stop rule, to mark saturated points (scripts/bench-curves passes its own).
    #[arg(long, default_value_t = 0.9)]
    pub min_ratio: f64,
    #[arg(long, default_value_t = 1000.0)]
    pub p99_limit_ms: f64,
}

pub fn plot(args: PlotArgs) -> anyhow::Result<()> {
    let dir = &args.dir;
    let run = std::fs::read_to_string(dir.join("run.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .unwrap_or(Value::Null);
    let rule = SaturationRule {
        min_ratio: args.min_ratio,
        p99_limit_ms: args.p99_limit_ms,
    };
    let mut md = String::new();
    let _ = writeln!(md, "{}\n", run_line(&run));
    for curve in CURVES {
        let points = load_curve(dir, curve)?;
        if points.is_empty() {
            continue;
        }
        let svg = dir.join(format!("{curve}.svg"));
        let (table, charts) = match curve {
            "instances" => instances(&points),
            "rate" => rate(&points, &rule),
            "backlog" => backlog(&points),
            _ => idle(&points),
        };
        draw(&svg, &charts).with_context(|| format!("drawing {}", svg.display()))?;
        eprintln!("plot: wrote {}", svg.display());
        md.push_str(&table);
        md.push('\n');
    }
    print!("{md}");
    std::fs::write(dir.join("curves.md"), &md)
        .with_context(|| format!("writing {}/curves.md", dir.display()))?;
    Ok(())
}

/// The run's settings in one line, so a table pasted alone still says what it measured.
fn run_line(run: &Value) -> String {
    let s = |k: &str| run.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
    let tiny = if run.get("tiny").and_then(Value::as_bool) == Some(true) {
        " — **tiny settings (a smoke run, not a measurement)**"
    } else {
        ""
    };
    format!(
        "Run {} at commit `{}`, {} CPUs, {} per latency point, {} s in all{tiny}.",
        s("date"),
        s("commit"),
        num(run, "/nproc").map_or("?".into(), |n| format!("{n}")),
        s("point_duration"),
        num(run, "/total_s").map_or("?".into(), |n| format!("{n:.0}")),
    )
}

// ---------------------------------------------------------------- charts

#[derive(Clone, Copy, PartialEq)]
enum Scale {
    Lin,
    Log,
}

struct Series {
    label: String,
    points: Vec<(f64, f64)>,
    color: RGBColor,
    /// A reference (ideal) line: dashed, no markers.
    reference: bool,
}

impl Series {
    fn new(label: &str, color: RGBColor, points: Vec<(f64, f64)>) -> Self {
        Series {
            label: label.to_owned(),
            points: points
                .into_iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect(),
            color,
            reference: false,
        }
    }
    fn reference(mut self) -> Self {
        self.reference = true;
        self
    }
}

struct Chart {
    caption: String,
    x_desc: String,
    y_desc: String,
    x: Scale,
    y: Scale,
    series: Vec<Series>,
    /// Points marked with a cross (saturated sweep points), as (x, y).
    marks: Vec<(f64, f64)>,
    marks_label: String,
    /// The x values are counts (instances): one tick per integer.
    integer_x: bool,
}

impl Chart {
    fn new(caption: &str, x_desc: &str, y_desc: &str, x: Scale, y: Scale) -> Self {
        Chart {
            caption: caption.to_owned(),
            x_desc: x_desc.to_owned(),
            y_desc: y_desc.to_owned(),
            x,
            y,
            series: Vec::new(),
            marks: Vec::new(),
            marks_label: String::new(),
            integer_x: false,
        }
    }
    fn with(mut self, s: Series) -> Self {
        self.series.push(s);
        self
    }
}

/// The whole figure: a title over panels side by side.
struct Figure {
    title: String,
    charts: Vec<Chart>,
}

const BLUE_: RGBColor = RGBColor(31, 119, 180);
const ORANGE_: RGBColor = RGBColor(255, 127, 14);
const GREEN_: RGBColor = RGBColor(44, 160, 44);
const RED_: RGBColor = RGBColor(214, 39, 40);
const GREY_: RGBColor = RGBColor(127, 127, 127);

fn draw(path: &Path, fig: &Figure) -> anyhow::Result<()> {
    let width = 40 + 520 * fig.charts.len() as u32;
    let root = SVGBackend::new(path, (width, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(&fig.title, ("sans-serif", 20))?;
    let panels = root.split_evenly((1, fig.charts.len().max(1)));
    for (chart, area) in fig.charts.iter().zip(&panels) {
        draw_chart(area, chart)?;
    }
    root.present()?;
    Ok(())
}

/// The axis range of some values: x a bit beyond the swept values; y from 0 (linear) or a
/// bit below the smallest (log) to above the largest, with a band on top kept free for the
/// legend (upper left), so it never covers a point.
fn extent(values: impl Iterator<Item = f64>, scale: Scale, is_y: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && (scale == Scale::Lin || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (if scale == Scale::Log { 1.0 } else { 0.0 }, 1.0);
    }
    match (scale, is_y) {
        (Scale::Log, false) => (lo / 1.25, hi * 1.25),
        (Scale::Log, true) => {
            let (lo, hi) = (lo / 1.5, hi * 1.5);
            // The data fill the lower ~70 % of the decades shown.
            (lo, hi * (hi / lo).powf(0.4))
        }
        (Scale::Lin, true) => (0.0, if hi > 0.0 { hi * 1.4 } else { 1.0 }),
        (Scale::Lin, false) => {
            let pad = ((hi - lo) * 0.06).max(hi.abs() * 0.03).max(0.5);
            (lo - pad, hi + pad)
        }
    }
}

/// A log axis whose ticks are 1, 2 and 5 × 10^k (plotters' own log axis labels every integer
/// multiple, which overlap, and none below the first power of ten).
struct Log125(LogCoord<f64>);

impl Ranged for Log125 {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.0.map(value, limit)
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        let r = self.0.range();
        let (lo, hi) = (r.start.min(r.end), r.start.max(r.end));
        let ticks = |mantissas: &[f64]| {
            let mut out = Vec::new();
            let mut decade = 10f64.powf(lo.log10().floor());
            while decade <= hi {
                for m in mantissas {
                    let v = m * decade;
                    if v >= lo && v <= hi {
                        out.push(v);
                    }
                }
                decade *= 10.0;
            }
            out
        };
        let max = hint.max_num_points().max(2);
        [
            &[1.0, 2.0, 3.0, 5.0][..],
            &[1.0, 2.0, 5.0],
            &[1.0, 3.0],
            &[1.0],
        ]
        .into_iter()
        .map(ticks)
        .find(|t| t.len() <= max)
        .unwrap_or_default()
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.0.range()
    }
}

fn log_axis(lo: f64, hi: f64) -> Log125 {
    Log125((lo..hi).log_scale().into())
}

fn draw_chart(area: &DrawingArea<SVGBackend<'_>, Shift>, c: &Chart) -> anyhow::Result<()> {
    let xs = c.series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = c.series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (x0, x1) = extent(xs, c.x, false);
    let (y0, y1) = extent(ys.chain(c.marks.iter().map(|m| m.1)), c.y, true);
    match (c.x, c.y) {
        (Scale::Lin, Scale::Lin) => draw_in(area, c, x0..x1, y0..y1),
        (Scale::Lin, Scale::Log) => draw_in(area, c, x0..x1, log_axis(y0, y1)),
        (Scale::Log, Scale::Lin) => draw_in(area, c, log_axis(x0, x1), y0..y1),
        (Scale::Log, Scale::Log) => draw_in(area, c, log_axis(x0, x1), log_axis(y0, y1)),
    }
}

fn draw_in<X, Y>(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    c: &Chart,
    x: X,
    y: Y,
) -> anyhow::Result<()>
where
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(&c.caption, ("sans-serif", 16))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)?;
    let x_range = chart.x_range();
    // Counts: as many labels as integers in the range, so the step is 1.
    let x_labels = if c.integer_x {
        ((x_range.end - x_range.start).floor() as usize + 1).clamp(2, 12)
    } else {
        8
    };
    chart
        .configure_mesh()
        .x_labels(x_labels)
        .y_labels(8)
        .x_desc(c.x_desc.as_str())
        .y_desc(c.y_desc.as_str())
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 14))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for s in &c.series {
        let color = s.color;
        if s.reference {
            chart
                .draw_series(DashedLineSeries::new(
                    s.points.iter().copied(),
                    6,
                    4,
                    color.stroke_width(1),
                ))?
                .label(s.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        } else {
            chart
                .draw_series(
                    LineSeries::new(s.points.iter().copied(), color.stroke_width(2)).point_size(3),
                )?
                .label(s.label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
    }
    if !c.marks.is_empty() {
        chart
            .draw_series(PointSeries::of_element(
                c.marks.iter().copied(),
                7,
                RED_.stroke_width(2),
                &|pos, size, style| Cross::new(pos, size, style),
            ))?
            .label(c.marks_label.as_str())
            .legend(|(x, y)| Cross::new((x + 10, y), 5, RED_.stroke_width(2)));
    }
    if c.series.len() + usize::from(!c.marks.is_empty()) > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 12))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;
    }
    Ok(())
}

/// An axis tick: 100,000 / 2,500 / 12.5 / 0.25.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        thousands(v.round())
    } else if a >= 100.0 || (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        trim(format!("{v:.1}"))
    } else {
        trim(format!("{v:.3}"))
    }
}

fn trim(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    if v < 0.0 {
        format!("-{out}")
    } else {
        out
    }
}

// ---------------------------------------------------------------- tables and figures

fn opt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.decimals$}"),
        _ => "–".into(),
    }
}

fn opt_count(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite())
        .map_or("–".into(), |x| thousands(x.round()))
}

fn count(v: f64) -> String {
    thousands(v)
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn lost_dup(p: &Point) -> String {
    format!(
        "{} / {}",
        count(p.r("/lost").unwrap_or(f64::NAN)),
        count(p.r("/duplicates").unwrap_or(f64::NAN))
    )
}

/// "ours / others": the capacity (2 cores × the window) used by mongod, the instances and
/// the load generator, and by everything else; others ≥ 10 % is marked — that point was
/// measured on a shared machine.
fn cpu_shares(p: &Point) -> String {
    let others = p.others_cpu_share();
    let mark = if others.is_some_and(|o| o >= 0.10) {
        "**"
    } else {
        ""
    };
    format!(
        "{} / {mark}{}{mark}",
        opt(p.measured_cpu_share().map(|s| 100.0 * s), 0),
        opt(others.map(|s| 100.0 * s), 0)
    )
}

fn series_of(points: &[Point], f: impl Fn(&Point) -> Option<f64>) -> Vec<(f64, f64)> {
    points
        .iter()
        .filter_map(|p| f(p).map(|y| (p.value, y)))
        .collect()
}

/// Curve 1: cost against the number of instances at one fixed rate.
/// `chart` with the points' p50 and p99 latency as its two series.
fn latency_chart(chart: Chart, points: &[Point]) -> Chart {
    chart
        .with(Series::new(
            "p50",
            BLUE_,
            series_of(points, |p| p.latency("p50")),
        ))
        .with(Series::new(
            "p99",
            ORANGE_,
            series_of(points, |p| p.latency("p99")),
        ))
}

fn instances(points: &[Point]) -> (String, Figure) {
    let rate = points[0].r("/params/rate").unwrap_or(f64::NAN);
    let mut t = format!(
        "### Instances at a fixed {rate:.0} msg/s\n\n\
         Latency: scheduled send → `chat_message` read by the receiver. CPU per delivered \
         message: CPU seconds over the send phase and the wait for the last deliveries, / \
         messages received. *CPU % ours / others*: of the machine's capacity over that \
         window, what mongod, the instances and the load generator used, and what other \
         processes did (≥ 10 % in bold: measured while something else ran).\n\n\
         | instances | delivered | achieved msg/s | p50 ms | p99 ms | p99.9 ms | mongod CPU ms/msg | instances CPU ms/msg (all) | per instance | peak RSS per instance MiB (mean / max) | mongod getMores/msg | lost / dup | CPU % ours / others |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for p in points {
        let rss = p.instance_peak_rss_mib();
        let inst = p.ms_per_message(p.instances_cpu_s());
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} |",
            p.value,
            count(p.received()),
            opt_count(p.achieved_rate()),
            opt(p.latency("p50"), 2),
            opt(p.latency("p99"), 2),
            opt(p.latency("p999"), 2),
            opt(p.ms_per_message(p.cpu_s("mongod")), 3),
            opt(inst, 3),
            opt(inst.map(|v| v / p.value.max(1.0)), 3),
            opt(mean(&rss), 1),
            opt(rss.iter().copied().reduce(f64::max), 1),
            opt(p.mongo_per_message("metrics.commands.getMore.total"), 2),
            lost_dup(p),
            cpu_shares(p),
        );
    }
    let mut lat = latency_chart(
        Chart::new(
            "insert → push latency (send → receive)",
            "instances",
            "latency (ms)",
            Scale::Lin,
            Scale::Lin,
        ),
        points,
    );
    let mut cpu = Chart::new(
        "CPU per delivered message",
        "instances",
        "CPU time per message (ms)",
        Scale::Lin,
        Scale::Lin,
    )
    .with(Series::new(
        "mongod",
        GREEN_,
        series_of(points, |p| p.ms_per_message(p.cpu_s("mongod"))),
    ))
    .with(Series::new(
        "all instances together",
        BLUE_,
        series_of(points, |p| p.ms_per_message(p.instances_cpu_s())),
    ));
    let mut rss = Chart::new(
        "memory per instance",
        "instances",
        "peak RSS (MiB)",
        Scale::Lin,
        Scale::Lin,
    )
    .with(Series::new(
        "mean over the instances",
        BLUE_,
        series_of(points, |p| mean(&p.instance_peak_rss_mib())),
    ))
    .with(Series::new(
        "largest instance",
        GREY_,
        series_of(points, |p| {
            p.instance_peak_rss_mib().into_iter().reduce(f64::max)
        }),
    ));
    for c in [&mut lat, &mut cpu, &mut rss] {
        c.integer_x = true;
    }
    // A point measured while other processes took a tenth of the machine or more: its
    // latency says more about them than about msgbuf.
    lat.marks = points
        .iter()
        .filter(|p| p.others_cpu_share().is_some_and(|o| o >= 0.10))
        .filter_map(|p| p.latency("p99").map(|y| (p.value, y)))
        .collect();
    lat.marks_label = "p99 measured while other processes used ≥ 10 % CPU".into();
    (
        t,
        Figure {
            title: format!("msgbuf: cost against instances, {rate:.0} msg/s"),
            charts: vec![lat, cpu, rss],
        },
    )
}

/// Curve 2: latency against offered rate on two instances — the knee.
fn rate(points: &[Point], rule: &SaturationRule) -> (String, Figure) {
    let mut t = String::from(
        "### Rate sweep on 2 instances\n\n\
         Offered: the open-loop send rate; achieved: messages received during the send phase \
         itself, per second. *Undelivered at end*: accepted but not yet pushed when the load \
         generator stopped waiting — still buffered, not lost. *CPU % ours / others* as in the \
         instances table.\n\n\
         | offered msg/s | achieved msg/s | achieved % | p50 ms | p99 ms | p99.9 ms | max ms | mongod CPU ms/msg | CPU % ours / others | undelivered at end | duplicates | verdict |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut marks = Vec::new();
    for p in points {
        let achieved = p.achieved_rate();
        let verdict = saturated(p, rule);
        if verdict.is_some() {
            if let Some(p99) = p.latency("p99") {
                marks.push((p.value, p99));
            }
        }
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            count(p.value),
            opt_count(achieved),
            opt(achieved.map(|a| 100.0 * a / p.value), 1),
            opt(p.latency("p50"), 2),
            opt(p.latency("p99"), 2),
            opt(p.latency("p999"), 2),
            opt(p.latency("max"), 1),
            opt(p.ms_per_message(p.cpu_s("mongod")), 3),
            cpu_shares(p),
            count(p.undelivered()),
            count(p.r("/duplicates").unwrap_or(f64::NAN)),
            verdict.map_or("below saturation".into(), |w| format!("**saturated**: {w}")),
        );
    }
    let mut lat = latency_chart(
        Chart::new(
            "latency against offered rate",
            "offered rate (msg/s, log)",
            "latency (ms, log)",
            Scale::Log,
            Scale::Log,
        ),
        points,
    );
    lat.marks = marks;
    lat.marks_label = "saturated (p99)".into();
    let top = points.iter().map(|p| p.value).fold(0.0, f64::max);
    let low = points.iter().map(|p| p.value).fold(f64::INFINITY, f64::min);
    let ach = Chart::new(
        "achieved against offered rate",
        "offered rate (msg/s, log)",
        "achieved rate (msg/s, log)",
        Scale::Log,
        Scale::Log,
    )
    .with(Series::new(
        "achieved",
        GREEN_,
        series_of(points, Point::achieved_rate),
    ))
    .with(Series::new("achieved = offered", GREY_, vec![(low, low), (top, top)]).reference());
    (
        t,
        Figure {
            title: "msgbuf: rate sweep on 2 instances".into(),
            charts: vec![lat, ach],
        },
    )
}

/// Curve 3: a backlog drained to a client that acks each message.
fn backlog(points: &[Point]) -> (String, Figure) {
    let drain_ms = |p: &Point| p.r("/extra/drain_ms");
    let recorded_ms = |p: &Point| p.r("/extra/recorded_ms");
    let mut t = String::from(
        "### Backlog drained to a joining client that acks every message\n\n\
         Drain: `join_chat` sent → the ack of the last message sent (each message acked as \
         it is read, one awaited send per ack). Recorded: `join_chat` sent → MongoDB shows \
         every message of the user delivered and acked (polled every 5 ms from the last ack \
         on). CPU over the drain: from the join to the end of \
         the load generator's 1 s watch for late duplicates; *idle* is what mongod used over \
         as long a time with nothing to do (measured for 3 s before the fill), and the cost per \
         message is net of it.\n\n\
         | pending | received | in order | lost / dup | joined ms | first message ms | drain ms | recorded ms | µs per message (recorded) | msg/s (recorded) | mongod CPU s (idle) | instances CPU s | mongod CPU µs/msg above idle | drain, recorded × vs previous (size ×) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let growth_of = |prev: Option<(f64, f64)>, ms: Option<f64>| match (prev, ms) {
        (Some((_, pms)), Some(ms)) if pms > 0.0 => format!("{:.1} ×", ms / pms),
        _ => "–".into(),
    };
    let mut prev: Option<(f64, f64)> = None;
    let mut prev_recorded: Option<(f64, f64)> = None;
    for p in points {
        let ms = drain_ms(p);
        let rec = recorded_ms(p);
        let n = p.received();
        let growth = match prev {
            Some((pv, _)) => format!(
                "{}, {} ({:.0} ×)",
                growth_of(prev, ms),
                growth_of(prev_recorded, rec),
                p.value / pv
            ),
            None => "–".into(),
        };
        if let Some(ms) = ms {
            prev = Some((p.value, ms));
        }
        if let Some(ms) = rec {
            prev_recorded = Some((p.value, ms));
        }
        let net = p.mongod_cpu_above_idle_s();
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            count(p.value),
            count(n),
            if p.r("/order_violations") == Some(0.0) {
                "yes"
            } else {
                "**no**"
            },
            lost_dup(p),
            opt(p.r("/extra/joined_ms"), 1),
            opt(p.r("/extra/first_message_ms"), 1),
            opt(ms, 1),
            opt(rec, 1),
            opt(rec.filter(|_| n > 0.0).map(|m| m * 1000.0 / n), 1),
            opt(rec.filter(|m| *m > 0.0).map(|m| n * 1000.0 / m), 0),
            format_args!(
                "{} ({})",
                opt(p.cpu_s("mongod"), 2),
                opt(p.mongod_idle_cpu_s(), 2)
            ),
            opt(p.instances_cpu_s(), 2),
            opt(net.filter(|_| n > 0.0).map(|s| s * 1e6 / n), 1),
            growth,
        );
    }
    for (clock, time) in [
        (
            "the client's clock (drain ms)",
            &drain_ms as &dyn Fn(&Point) -> Option<f64>,
        ),
        ("the recorded clock (recorded ms)", &recorded_ms),
    ] {
        let at = |k: f64| points.iter().find(|p| p.value == k).and_then(time);
        if let (Some(a), Some(b)) = (at(10_000.0), at(100_000.0)) {
            let _ = writeln!(
                t,
                "\nTarget, on {clock}: 100,000 drained in ≤ 10 × the 10,000 time = {:.0} ms: {:.0} ms ({:.1} ×), **{}**.",
                10.0 * a,
                b,
                b / a,
                if b <= 10.0 * a { "met" } else { "missed" }
            );
        }
    }
    // Linear growth through the smallest point, for the eye.
    let linear = points
        .iter()
        .find_map(|p| drain_ms(p).map(|ms| (p.value, ms)))
        .map(|(v0, ms0)| {
            points
                .iter()
                .map(|p| (p.value, ms0 * p.value / v0))
                .collect()
        })
        .unwrap_or_default();
    let time = Chart::new(
        "drain time against backlog",
        "pending messages (log)",
        "join → last ack, → all recorded (ms, log)",
        Scale::Log,
        Scale::Log,
    )
    .with(Series::new(
        "drain time (last ack sent)",
        BLUE_,
        series_of(points, drain_ms),
    ))
    .with(Series::new(
        "recorded (all delivered and acked in MongoDB)",
        GREEN_,
        series_of(points, recorded_ms),
    ))
    .with(Series::new("linear from the smallest", GREY_, linear).reference());
    let per = Chart::new(
        "cost per message",
        "pending messages (log)",
        "µs per message",
        Scale::Log,
        Scale::Lin,
    )
    .with(Series::new(
        "recorded time per message",
        BLUE_,
        series_of(points, |p| {
            let n = p.received();
            recorded_ms(p).filter(|_| n > 0.0).map(|m| m * 1000.0 / n)
        }),
    ))
    .with(Series::new(
        "mongod CPU per message (above idle)",
        GREEN_,
        series_of(points, |p| {
            let n = p.received();
            p.mongod_cpu_above_idle_s()
                .filter(|_| n > 0.0)
                .map(|s| s * 1e6 / n)
        }),
    ));
    (
        t,
        Figure {
            title: "msgbuf: draining a backlog (each message acked)".into(),
            charts: vec![time, per],
        },
    )
}

/// Curve 4: memory of joined idle connections on one instance.
fn idle(points: &[Point]) -> (String, Figure) {
    let joined = |p: &Point| p.r("/extra/joined").unwrap_or(0.0);
    let before = |p: &Point| p.r("/extra/server_rss_before_kib").map(|k| k / 1024.0);
    let after = |p: &Point| p.r("/extra/server_rss_joined_kib").map(|k| k / 1024.0);
    let per_conn = |p: &Point| {
        p.r("/extra/server_rss_growth_bytes_per_conn")
            .map(|b| b / 1024.0)
    };
    let mut t = String::from(
        "### Idle joined connections on one instance\n\n\
         RSS of the (fresh) instance before the first connection and 2 s after the last join; \
         per connection = growth / joined; marginal = the growth from the previous point's \
         RSS to this one's / the extra connections (fixed costs cancel out).\n\n\
         | connections | joined | connect s | joins/s | RSS before MiB | RSS joined MiB | KiB per connection | marginal KiB per connection | dropped | mongod CPU s |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut prev: Option<(f64, f64)> = None;
    let mut marginal = Vec::new();
    for p in points {
        let n = joined(p);
        let m = match (prev, after(p)) {
            (Some((pn, prss)), Some(rss)) if n > pn => Some((rss - prss) * 1024.0 / (n - pn)),
            _ => None,
        };
        if let Some(m) = m {
            marginal.push((p.value, m));
        }
        if let Some(rss) = after(p) {
            prev = Some((n, rss));
        }
        let connect_s = p.r("/extra/connect_s");
        let requested = p
            .procs
            .as_ref()
            .and_then(|v| num(v, "/requested"))
            .filter(|r| *r != p.value)
            .map_or(String::new(), |r| {
                format!(" (asked {}, capped by RLIMIT_NOFILE)", count(r))
            });
        let _ = writeln!(
            t,
            "| {}{requested} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            count(p.value),
            count(n),
            opt(connect_s, 1),
            opt(connect_s.filter(|s| *s > 0.0).map(|s| n / s), 0),
            opt(before(p), 1),
            opt(after(p), 1),
            opt(per_conn(p), 2),
            opt(m, 2),
            count(p.r("/extra/dropped_while_held").unwrap_or(f64::NAN)),
            opt(p.cpu_s("mongod"), 1),
        );
    }
    let rss = Chart::new(
        "instance RSS against connections",
        "joined connections",
        "RSS (MiB)",
        Scale::Lin,
        Scale::Lin,
    )
    .with(Series::new("all joined", BLUE_, series_of(points, after)))
    .with(Series::new(
        "before the first",
        GREY_,
        series_of(points, before),
    ));
    let per = Chart::new(
        "memory per connection",
        "joined connections",
        "RSS per connection (KiB)",
        Scale::Lin,
        Scale::Lin,
    )
    .with(Series::new(
        "growth / joined",
        BLUE_,
        series_of(points, per_conn),
    ))
    .with(Series::new(
        "marginal (from the previous point)",
        ORANGE_,
        marginal,
    ));
    (
        t,
        Figure {
            title: "msgbuf: idle joined connections on one instance".into(),
            charts: vec![rss, per],
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(dir: &Path, name: &str, v: &Value) {
        std::fs::write(dir.join(name), v.to_string()).expect("write test file");
    }

    /// A run directory with two points per curve, in the shapes the script and the load
    /// generator write: every curve gets its SVG (with its axis labels) and its table.
    #[test]
    fn a_run_directory_gives_one_svg_and_one_table_per_curve() {
        let dir = std::env::temp_dir().join(format!("msgbuf-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let procs = |n: u64| {
            let mut processes = serde_json::Map::new();
            processes.insert(
                "mongod".into(),
                json!({"cpu_s": 10.0, "peak_rss_kib": 150000}),
            );
            for i in 1..=n {
                processes.insert(
                    format!("msgbuf-{i}"),
                    json!({"cpu_s": 1.0, "peak_rss_kib": 20000 + 1000 * i}),
                );
            }
            json!({"window_s": 21.0, "nproc": 2, "machine_busy_s": 30.0, "processes": processes,
                   "mongod_idle_cpu_per_s": 0.05})
        };
        let latency = |rate: f64, p99: f64| {
            json!({"params": {"rate": rate, "duration_s": 2.0}, "received": 2.0 * rate, "lost": 0,
                   "duplicates": 0, "latency_ms": {"count": 1, "p50": p99 / 4.0, "p99": p99, "p999": p99, "max": p99},
                   "extra": {"received_per_second": [rate, rate]}})
        };
        for (n, p99) in [(1u64, 10.0), (4, 14.0)] {
            write(&dir, &format!("instances-{n}.json"), &latency(300.0, p99));
            write(&dir, &format!("instances-{n}.procs.json"), &procs(n));
        }
        for (rate, p99) in [(100.0, 8.0), (4000.0, 2500.0)] {
            write(&dir, &format!("rate-{rate}.json"), &latency(rate, p99));
            write(&dir, &format!("rate-{rate}.procs.json"), &procs(2));
        }
        for (k, ms) in [(10_000.0, 400.0), (100_000.0, 4200.0)] {
            write(
                &dir,
                &format!("backlog-{k}.json"),
                &json!({"received": k, "lost": 0, "duplicates": 0, "order_violations": 0,
                        "extra": {"drain_ms": ms, "recorded_ms": ms + 50.0, "joined_ms": 5.0, "first_message_ms": 6.0}}),
            );
            write(&dir, &format!("backlog-{k}.procs.json"), &procs(2));
        }
        for c in [2000.0, 19000.0] {
            write(
                &dir,
                &format!("idle-{c}.json"),
                &json!({"extra": {"joined": c, "connect_s": 10.0, "server_rss_before_kib": 30000.0,
                                  "server_rss_joined_kib": 30000.0 + 9.0 * c,
                                  "server_rss_growth_bytes_per_conn": 9216.0, "dropped_while_held": 0}}),
            );
        }
        plot(PlotArgs {
            dir: dir.clone(),
            min_ratio: 0.9,
            p99_limit_ms: 1000.0,
        })
        .expect("plot");
        for (curve, label) in [
            ("instances", "instances"),
            ("rate", "offered rate"),
            ("backlog", "pending messages"),
            ("idle", "joined connections"),
        ] {
            let svg =
                std::fs::read_to_string(dir.join(format!("{curve}.svg"))).expect("svg written");
            assert!(
                svg.starts_with("<svg") && svg.contains(label),
                "{curve}.svg"
            );
        }
        let md = std::fs::read_to_string(dir.join("curves.md")).expect("tables written");
        assert!(md.contains("**saturated**: p99 2500 ms"));
        assert!(md.contains("4200 ms (10.5 ×), **missed**"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn ticks_read_like_numbers() {
        assert_eq!(tick(100_000.0), "100,000");
        assert_eq!(tick(2500.0), "2,500");
        assert_eq!(tick(250.0), "250");
        assert_eq!(tick(12.5), "12.5");
        assert_eq!(tick(3.0), "3");
        assert_eq!(tick(0.25), "0.25");
    }
}
