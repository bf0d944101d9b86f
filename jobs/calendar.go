package jobs

import (
	"errors"
	"fmt"
	"strings"
	"time"
	_ "time/tzdata" // plans name IANA zones; the runtime image need not ship zoneinfo

	"github.com/robfig/cron/v3"
)

// The calendar rules of installment plans and scheduled top-ups. They are plain functions of
// their inputs (no clock, no database) so that table tests pin them down; the monthly rule is
// also written in SQL (billing.monthly_due_at, used by the due computation for speed) and a test
// keeps the two equal.
//
// Local times that a daylight-saving change skips or repeats resolve as PostgreSQL resolves
// `timestamp AT TIME ZONE zone`: a skipped time (02:30 on a spring-forward night) moves forward by
// the length of the gap (03:30), and a repeated time (02:30 on a fall-back night) means its later
// occurrence. Each local date-time therefore names exactly one instant, and a schedule fires once
// for it.

// LocalTime returns the instant at which the wall clock in loc reads the given date and time,
// with the daylight-saving rule above. Out-of-range fields normalise as in time.Date.
func LocalTime(year int, month time.Month, day, hour, min, sec, nsec int, loc *time.Location) time.Time {
	naive := time.Date(year, month, day, hour, min, sec, nsec, time.UTC)
	t := time.Date(year, month, day, hour, min, sec, nsec, loc) // one of the readings; Go does not say which
	if wallClock(t).Equal(naive) {
		// The time exists. If the zone period that t lies in ends in a fall-back transition,
		// the same wall time may come round again after it: prefer that later occurrence.
		if _, end := t.ZoneBounds(); !end.IsZero() {
			_, offAfter := end.Zone()
			later := naive.Add(-time.Duration(offAfter) * time.Second)
			if !later.Before(end) && later.After(t) && wallClock(later.In(loc)).Equal(naive) {
				return later.In(loc)
			}
		}
		return t
	}
	// The time falls in a spring-forward gap. Read it with the offset in force before the gap,
	// which lands the same distance past the gap's end.
	if wallClock(t).After(naive) {
		return t // Go already read it with the offset before the gap
	}
	_, offBefore := t.Zone()
	return naive.Add(-time.Duration(offBefore) * time.Second).In(loc)
}

// wallClock returns t's date and clock reading in its own location, as a UTC time: a value that
// orders wall-clock readings and does no daylight-saving arithmetic.
func wallClock(t time.Time) time.Time {
	return time.Date(t.Year(), t.Month(), t.Day(), t.Hour(), t.Minute(), t.Second(), t.Nanosecond(), time.UTC)
}

// daysIn returns the number of days of month m of year y.
func daysIn(y int, m time.Month) int {
	return time.Date(y, m+1, 0, 0, 0, 0, 0, time.UTC).Day()
}

// MonthlyDue returns when installment n (1-based) of a plan on a monthly anchor day falls due.
//
// Installments fall on anchorDay (1..31) of consecutive months, clamped to the month's last day
// (31 becomes 30 in April and 28 or 29 in February, and returns to 31 in March: each date is
// computed from the anchor, never from the previous due date, so clamping does not drift), at the
// local time of day of start, in loc. The first installment is the first such date-time at or
// after start (local date). The result follows LocalTime's daylight-saving rule.
//
// billing.monthly_due_at is the same rule in SQL.
func MonthlyDue(start time.Time, loc *time.Location, anchorDay, n int) time.Time {
	ls := start.In(loc)
	y, m, d := ls.Date()
	first := 0
	if min(anchorDay, daysIn(y, m)) < d {
		first = 1 // this month's anchor date has passed
	}
	months := int(m) - 1 + first + n - 1
	yy, mm := y+months/12, time.Month(months%12+1)
	day := min(anchorDay, daysIn(yy, mm))
	return LocalTime(yy, mm, day, ls.Hour(), ls.Minute(), ls.Second(), ls.Nanosecond(), loc)
}

// Schedule is a plan's or top-up rule's cron schedule: robfig/cron's standard syntax (five fields,
// or a descriptor such as @monthly or @every 24h), optionally prefixed with CRON_TZ=<zone>.
//
// Fields are matched against the wall clock of the schedule's zone, and each matching local
// date-time becomes one instant by LocalTime's rule. So "30 2 * * *" in Europe/Paris fires at
// 03:30 on the spring-forward day (robfig's own Next skips that day, and "30 2 30 3 *" would skip
// a whole year) and once, not twice, on the fall-back day. An hourly schedule gives one firing for
// the skipped hour and one for the repeated hour. @every durations count elapsed time instead.
type Schedule struct {
	expr string
	loc  *time.Location
	spec cron.Schedule // parsed with CRON_TZ=UTC: evaluated on wall-clock values
	wall bool          // false for @every, which counts elapsed time
}

// maxShift bounds how far the daylight-saving rule can move a wall time (the largest gap or
// overlap, with margin): the search for the next occurrence looks that far back and ahead.
const maxShift = 3 * time.Hour

// minEvery is the shortest @every interval a plan or rule may use.
const minEvery = time.Minute

// ParseSchedule parses a cron expression with cron.ParseStandard. The zone is the expression's
// CRON_TZ= (or TZ=) prefix when present, else defaultZone ("" means UTC). "Local" is refused, since
// a schedule must not depend on the server's zone, and so is @every below one minute.
func ParseSchedule(expr, defaultZone string) (*Schedule, error) {
	expr = strings.TrimSpace(expr)
	zone, body := defaultZone, expr
	if strings.HasPrefix(expr, "CRON_TZ=") || strings.HasPrefix(expr, "TZ=") {
		i := strings.IndexAny(expr, " \t")
		if i < 0 {
			return nil, errors.New("CRON_TZ= must be followed by a time zone, a space and the schedule")
		}
		zone, body = expr[strings.Index(expr, "=")+1:i], strings.TrimSpace(expr[i:])
	}
	if body == "" {
		return nil, errors.New("empty cron expression")
	}
	if zone == "" {
		zone = "UTC"
	}
	if zone == "Local" {
		return nil, errors.New(`time zone "Local" is not allowed: name an IANA zone such as Europe/Paris`)
	}
	loc, err := time.LoadLocation(zone)
	if err != nil {
		return nil, fmt.Errorf("time zone %q: %w", zone, err)
	}
	spec, err := cron.ParseStandard("CRON_TZ=UTC " + body)
	if err != nil {
		return nil, fmt.Errorf("cron expression %q: %w", body, err)
	}
	s := &Schedule{expr: expr, loc: loc, spec: spec, wall: true}
	if every, ok := spec.(cron.ConstantDelaySchedule); ok {
		if every.Delay < minEvery {
			return nil, fmt.Errorf("cron expression %q: @every must be at least %s", body, minEvery)
		}
		s.wall = false
	}
	return s, nil
}

// Location returns the zone the schedule is read in.
func (s *Schedule) Location() *time.Location { return s.loc }

// String returns the expression as given.
func (s *Schedule) String() string { return s.expr }

// Next returns the schedule's first occurrence strictly after t, in the schedule's zone, or the
// zero time when there is none within five years (robfig's search limit: "0 0 30 2 *" never
// fires). Calling Next again with its own result walks every occurrence once, in order: that is
// how missed periods are caught up.
func (s *Schedule) Next(t time.Time) time.Time {
	if !s.wall {
		return s.spec.Next(t).In(s.loc)
	}
	// Fast path: when no offset change lies within maxShift of t or of the candidate, wall clock
	// and instants map one to one there, and the next wall-clock occurrence is the answer.
	tl := t.In(s.loc)
	w := s.spec.Next(wallClock(tl))
	if w.IsZero() {
		return time.Time{}
	}
	at := LocalTime(w.Year(), w.Month(), w.Day(), w.Hour(), w.Minute(), w.Second(), 0, s.loc)
	if start, end := tl.ZoneBounds(); (start.IsZero() || start.Before(t.Add(-maxShift))) &&
		(end.IsZero() || end.After(at.Add(maxShift))) {
		return at
	}
	// Near a change: the daylight-saving rule moves a wall time by less than maxShift, so
	// occurrences whose wall time is more than maxShift before t's cannot be after t, and once one
	// is found, occurrences more than maxShift after it cannot be earlier. Look through that
	// window for the earliest.
	w = wallClock(tl).Add(-maxShift)
	var best, bestWall time.Time
	for {
		w = s.spec.Next(w)
		if w.IsZero() || (!best.IsZero() && w.Sub(bestWall) > maxShift) {
			return best
		}
		at := LocalTime(w.Year(), w.Month(), w.Day(), w.Hour(), w.Minute(), w.Second(), 0, s.loc)
		if at.After(t) && (best.IsZero() || at.Before(best)) {
			best, bestWall = at, w
		}
	}
}

// First returns the schedule's first occurrence at or after start, or the zero time when there
// is none within five years.
func (s *Schedule) First(start time.Time) time.Time {
	return s.Next(start.Add(-time.Nanosecond))
}
