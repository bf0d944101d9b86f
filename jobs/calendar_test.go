package jobs_test

import (
	"testing"
	"time"

	"github.com/robfig/cron/v3"
	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/jobs"
)

func mustZone(t testing.TB, name string) *time.Location {
	t.Helper()
	loc, err := time.LoadLocation(name)
	require.NoError(t, err)
	return loc
}

func utc(s string) time.Time {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		panic(err)
	}
	return t.UTC()
}

func TestLocalTime(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		zone string
		wall string // local date-time, 2006-01-02T15:04:05
		want string // the instant, UTC
	}{
		{"ordinary winter time", "Europe/Paris", "2025-01-15T10:00:00", "2025-01-15T09:00:00Z"},
		{"ordinary summer time", "Europe/Paris", "2025-06-15T10:00:00", "2025-06-15T08:00:00Z"},
		{"spring-forward gap moves forward", "Europe/Paris", "2025-03-30T02:30:00", "2025-03-30T01:30:00Z"}, // 03:30 CEST
		{"gap start", "Europe/Paris", "2025-03-30T02:00:00", "2025-03-30T01:00:00Z"},                        // 03:00 CEST
		{"just after the gap", "Europe/Paris", "2025-03-30T03:00:00", "2025-03-30T01:00:00Z"},
		{"fall-back overlap takes the later", "Europe/Paris", "2025-10-26T02:30:00", "2025-10-26T01:30:00Z"}, // 02:30 CET
		{"just before the overlap", "Europe/Paris", "2025-10-26T01:59:00", "2025-10-25T23:59:00Z"},
		{"New York gap", "America/New_York", "2018-03-11T02:30:00", "2018-03-11T07:30:00Z"},
		{"New York overlap", "America/New_York", "2018-11-04T01:30:00", "2018-11-04T06:30:00Z"},
		{"half-hour gap", "Australia/Lord_Howe", "2025-10-05T02:10:00", "2025-10-04T15:40:00Z"},
		{"half-hour overlap", "Australia/Lord_Howe", "2025-04-06T01:45:00", "2025-04-05T15:15:00Z"},
		{"southern hemisphere gap", "Australia/Sydney", "2025-10-05T02:30:00", "2025-10-04T16:30:00Z"},
		{"no daylight saving", "Asia/Tokyo", "2025-03-30T02:30:00", "2025-03-29T17:30:00Z"},
		{"UTC", "UTC", "2024-02-29T23:59:59", "2024-02-29T23:59:59Z"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			loc := mustZone(t, tc.zone)
			w, err := time.Parse("2006-01-02T15:04:05", tc.wall)
			require.NoError(t, err)
			got := jobs.LocalTime(w.Year(), w.Month(), w.Day(), w.Hour(), w.Minute(), w.Second(), 0, loc)
			require.Equal(t, utc(tc.want), got.UTC(), "got %s", got)
			require.Equal(t, loc, got.Location())
		})
	}
}

func TestMonthlyDue(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		zone   string
		start  string // RFC 3339
		anchor int
		want   []string // installments 1..n, local wall time in zone
	}{
		{"31st clamps to month ends and comes back", "Europe/Paris", "2025-01-31T10:00:00+01:00", 31,
			[]string{"2025-01-31 10:00", "2025-02-28 10:00", "2025-03-31 10:00", "2025-04-30 10:00", "2025-05-31 10:00"}},
		{"leap year February", "UTC", "2024-01-31T00:00:00Z", 31,
			[]string{"2024-01-31 00:00", "2024-02-29 00:00", "2024-03-31 00:00"}},
		{"29th in a common and a leap year", "UTC", "2023-01-29T08:00:00Z", 29,
			[]string{"2023-01-29 08:00", "2023-02-28 08:00", "2023-03-29 08:00", "2023-04-29 08:00", "2023-05-29 08:00",
				"2023-06-29 08:00", "2023-07-29 08:00", "2023-08-29 08:00", "2023-09-29 08:00", "2023-10-29 08:00",
				"2023-11-29 08:00", "2023-12-29 08:00", "2024-01-29 08:00", "2024-02-29 08:00"}},
		{"anchor before the start day starts next month", "UTC", "2025-01-15T12:00:00Z", 10,
			[]string{"2025-02-10 12:00", "2025-03-10 12:00"}},
		{"anchor on the start day starts that day", "UTC", "2025-01-10T15:00:00Z", 10,
			[]string{"2025-01-10 15:00", "2025-02-10 15:00"}},
		{"clamped anchor already past starts next month", "UTC", "2025-04-30T09:00:00Z", 29,
			[]string{"2025-05-29 09:00"}},
		{"start on February's last day with anchor 31", "UTC", "2025-02-28T09:00:00Z", 31,
			[]string{"2025-02-28 09:00", "2025-03-31 09:00"}},
		{"year boundary", "UTC", "2025-11-30T09:00:00Z", 31,
			[]string{"2025-11-30 09:00", "2025-12-31 09:00", "2026-01-31 09:00", "2026-02-28 09:00"}},
		{"local date decides the month, not UTC's", "Asia/Tokyo", "2025-01-31T23:30:00Z", 1, // Feb 1 08:30 in Tokyo
			[]string{"2025-02-01 08:30", "2025-03-01 08:30"}},
		{"time of day kept across DST", "Europe/Paris", "2025-03-15T09:00:00+01:00", 15,
			[]string{"2025-03-15 09:00", "2025-04-15 09:00"}},
		{"02:30 skipped by spring-forward moves to 03:30", "Europe/Paris", "2025-02-28T02:30:00+01:00", 30, // Feb 28: clamped 30th
			[]string{"2025-02-28 02:30", "2025-03-30 03:30", "2025-04-30 02:30"}},
		{"02:30 repeated by fall-back is charged once, the second time", "Europe/Paris", "2025-09-26T02:30:00+02:00", 26,
			[]string{"2025-09-26 02:30 +0200", "2025-10-26 02:30 +0100", "2025-11-26 02:30 +0100"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			loc := mustZone(t, tc.zone)
			start, err := time.Parse(time.RFC3339, tc.start)
			require.NoError(t, err)
			var prev time.Time
			for i, want := range tc.want {
				got := jobs.MonthlyDue(start, loc, tc.anchor, i+1)
				layout := "2006-01-02 15:04"
				if len(want) > len(layout) {
					layout += " -0700"
				}
				require.Equal(t, want, got.In(loc).Format(layout), "installment %d", i+1)
				require.False(t, got.Before(start), "installment %d is before the start", i+1)
				require.True(t, got.After(prev), "installment %d is not after the previous one", i+1)
				prev = got
			}
		})
	}
}

func TestParseScheduleErrors(t *testing.T) {
	t.Parallel()
	cases := []struct {
		expr, zone string
	}{
		{"", "UTC"},
		{"* * * *", "UTC"},      // four fields
		{"0 0 * * * *", "UTC"},  // six: seconds are not standard
		{"61 * * * *", "UTC"},   // minute out of range
		{"0 24 * * *", "UTC"},   // hour out of range
		{"0 0 * * 7", "UTC"},    // robfig's weekdays are 0-6
		{"0 0 L * *", "UTC"},    // no L
		{"@fortnightly", "UTC"}, // unknown descriptor
		{"@every 30s", "UTC"},   // too short for a charge
		{"0 0 1 * *", "Mars/Olympus_Mons"},
		{"0 0 1 * *", "Local"}, // the server's zone is not a plan's zone
		{"CRON_TZ=Mars/Olympus_Mons 0 0 1 * *", "UTC"},
		{"CRON_TZ=Europe/Paris", "UTC"}, // robfig's parser would panic on this one
		{"CRON_TZ=Europe/Paris ", "UTC"},
	}
	for _, tc := range cases {
		_, err := jobs.ParseSchedule(tc.expr, tc.zone)
		require.Error(t, err, "%q in %s", tc.expr, tc.zone)
	}
}

// walk returns the schedule's occurrences after from, up to and including until.
func walk(s *jobs.Schedule, from, until time.Time) []time.Time {
	var out []time.Time
	for t := s.Next(from); !t.IsZero() && !t.After(until); t = s.Next(t) {
		out = append(out, t)
	}
	return out
}

func TestScheduleNext(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name  string
		expr  string
		zone  string // the plan's time_zone
		after string // RFC 3339
		want  []string
	}{
		{"monthly on the 1st at 09:00 UTC", "0 9 1 * *", "UTC", "2025-01-15T00:00:00Z",
			[]string{"2025-02-01T09:00:00Z", "2025-03-01T09:00:00Z", "2025-04-01T09:00:00Z"}},
		{"the plan's zone applies", "0 9 1 * *", "Asia/Tokyo", "2025-01-15T00:00:00Z",
			[]string{"2025-02-01T00:00:00Z", "2025-03-01T00:00:00Z"}},
		{"CRON_TZ follows New York's DST", "CRON_TZ=America/New_York 0 9 1 3,4,11,12 *", "UTC", "2025-02-15T00:00:00Z",
			[]string{"2025-03-01T14:00:00Z", "2025-04-01T13:00:00Z", "2025-11-01T13:00:00Z", "2025-12-01T14:00:00Z"}},
		{"CRON_TZ with a descriptor", "CRON_TZ=Asia/Tokyo @daily", "UTC", "2025-01-01T00:00:00Z",
			[]string{"2025-01-01T15:00:00Z", "2025-01-02T15:00:00Z"}},
		{"TZ= prefix too", "TZ=Europe/Paris 0 0 1 1 *", "UTC", "2025-06-01T00:00:00Z",
			[]string{"2025-12-31T23:00:00Z", "2026-12-31T23:00:00Z"}},
		{"daily 02:30 over spring-forward fires once at 03:30", "30 2 * * *", "Europe/Paris", "2025-03-28T12:00:00Z",
			[]string{"2025-03-29T01:30:00Z", "2025-03-30T01:30:00Z", "2025-03-31T00:30:00Z"}},
		{"yearly on a skipped time still fires that year", "CRON_TZ=Europe/Paris 30 2 30 3 *", "UTC", "2025-01-01T00:00:00Z",
			[]string{"2025-03-30T01:30:00Z", "2026-03-30T00:30:00Z"}},
		{"daily 02:30 over fall-back fires once, the second time", "30 2 * * *", "Europe/Paris", "2025-10-25T12:00:00Z",
			[]string{"2025-10-26T01:30:00Z", "2025-10-27T01:30:00Z"}},
		{"hourly over spring-forward: the skipped hour fires once", "0 * * * *", "Europe/Paris", "2025-03-29T23:30:00Z",
			[]string{"2025-03-30T00:00:00Z", "2025-03-30T01:00:00Z", "2025-03-30T02:00:00Z"}},
		{"hourly over fall-back: the repeated hour fires once", "0 * * * *", "Europe/Paris", "2025-10-25T22:30:00Z",
			[]string{"2025-10-25T23:00:00Z", "2025-10-26T01:00:00Z", "2025-10-26T02:00:00Z"}},
		{"@every counts elapsed time across DST", "@every 24h", "Europe/Paris", "2025-03-29T10:00:00Z",
			[]string{"2025-03-30T10:00:00Z", "2025-03-31T10:00:00Z"}},
		{"weekday names", "0 9 * * mon", "UTC", "2025-01-01T00:00:00Z", // a Wednesday
			[]string{"2025-01-06T09:00:00Z", "2025-01-13T09:00:00Z"}},
		{"29 February only in leap years", "0 0 29 2 *", "UTC", "2025-01-01T00:00:00Z",
			[]string{"2028-02-29T00:00:00Z"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s, err := jobs.ParseSchedule(tc.expr, tc.zone)
			require.NoError(t, err)
			var got []string
			at := utc(tc.after)
			for range tc.want {
				at = s.Next(at)
				require.False(t, at.IsZero())
				got = append(got, at.UTC().Format(time.RFC3339))
			}
			require.Equal(t, tc.want, got)
		})
	}
}

func TestScheduleNeverFires(t *testing.T) {
	t.Parallel()
	s, err := jobs.ParseSchedule("0 0 30 2 *", "UTC")
	require.NoError(t, err, "robfig accepts it")
	require.True(t, s.Next(utc("2025-01-01T00:00:00Z")).IsZero())
	require.True(t, s.First(utc("2025-01-01T00:00:00Z")).IsZero())
}

func TestScheduleFirst(t *testing.T) {
	t.Parallel()
	s, err := jobs.ParseSchedule("0 9 1 * *", "UTC")
	require.NoError(t, err)
	require.Equal(t, utc("2025-02-01T09:00:00Z"), s.First(utc("2025-02-01T09:00:00Z")), "an occurrence at the start counts")
	require.Equal(t, utc("2025-03-01T09:00:00Z"), s.First(utc("2025-02-01T09:00:00.5Z")))
	require.Equal(t, utc("2025-02-01T09:00:00Z"), s.First(utc("2025-01-31T23:00:00Z")))
}

// TestCatchUp is the rule the due computation relies on after downtime: walking Next from the
// last charged period to now yields every missed period once, in order, and nothing in the future.
func TestCatchUp(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name        string
		expr, zone  string
		last, now   string
		wantPeriods []string
	}{
		{"four months down", "0 0 1 * *", "UTC", "2025-01-01T00:00:00Z", "2025-05-15T00:00:00Z",
			[]string{"2025-02-01T00:00:00Z", "2025-03-01T00:00:00Z", "2025-04-01T00:00:00Z", "2025-05-01T00:00:00Z"}},
		{"now exactly on a period includes it", "0 0 1 * *", "UTC", "2025-01-01T00:00:00Z", "2025-03-01T00:00:00Z",
			[]string{"2025-02-01T00:00:00Z", "2025-03-01T00:00:00Z"}},
		{"nothing missed", "0 0 1 * *", "UTC", "2025-01-01T00:00:00Z", "2025-01-31T23:59:59Z", nil},
		{"daily over a DST weekend", "30 2 * * *", "Europe/Paris", "2025-03-28T01:30:00Z", "2025-03-31T12:00:00Z",
			[]string{"2025-03-29T01:30:00Z", "2025-03-30T01:30:00Z", "2025-03-31T00:30:00Z"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s, err := jobs.ParseSchedule(tc.expr, tc.zone)
			require.NoError(t, err)
			var got []string
			for _, at := range walk(s, utc(tc.last), utc(tc.now)) {
				got = append(got, at.UTC().Format(time.RFC3339))
			}
			require.Equal(t, tc.wantPeriods, got)
		})
	}
}

// transitions returns the instants at which loc's UTC offset changes during year.
func transitions(loc *time.Location, year int) []time.Time {
	var out []time.Time
	t := time.Date(year, 1, 1, 0, 0, 0, 0, loc)
	for {
		_, end := t.ZoneBounds()
		if end.IsZero() || end.Year() > year {
			return out
		}
		out = append(out, end)
		t = end
	}
}

// TestScheduleNearDSTChanges walks sub-daily schedules across every offset change of 2018 in
// zones with 1-hour and 30-minute shifts, in both hemispheres. Each occurrence must be after the
// previous one, no local wall time may fire twice, and Next (from occurrences and from any
// instant nearby) must agree with a brute-force reference: every wall-clock minute near t that the expression matches, mapped to an instant by
// LocalTime, the earliest after t.
func TestScheduleNearDSTChanges(t *testing.T) {
	t.Parallel()
	for _, zone := range []string{"Europe/Paris", "America/New_York", "Australia/Lord_Howe", "America/Sao_Paulo"} {
		loc := mustZone(t, zone)
		changes := transitions(loc, 2018)
		require.Len(t, changes, 2, zone)
		for _, expr := range []string{"0 * * * *", "0,30 * * * *", "45 */2 * * *", "30 2 * * *"} {
			s, err := jobs.ParseSchedule(expr, zone)
			require.NoError(t, err)
			parsed, err := cron.ParseStandard(expr)
			require.NoError(t, err)
			spec := parsed.(*cron.SpecSchedule) // every day of every month: minute and hour decide
			matches := func(m time.Time) bool {
				return spec.Minute&(1<<uint(m.Minute())) != 0 && spec.Hour&(1<<uint(m.Hour())) != 0
			}
			reference := func(after time.Time) time.Time {
				w := time.Date(after.In(loc).Year(), after.In(loc).Month(), after.In(loc).Day(), after.In(loc).Hour(), after.In(loc).Minute(), 0, 0, time.UTC)
				var best, bestWall time.Time
				for m := w.Add(-3 * time.Hour); m.Before(w.Add(27 * time.Hour)); m = m.Add(time.Minute) {
					if !best.IsZero() && m.Sub(bestWall) > 3*time.Hour {
						break // no wall time this much later can map to an earlier instant
					}
					if !matches(m) {
						continue
					}
					at := jobs.LocalTime(m.Year(), m.Month(), m.Day(), m.Hour(), m.Minute(), 0, 0, loc)
					if at.After(after) && (best.IsZero() || at.Before(best)) {
						best, bestWall = at, m
					}
				}
				return best
			}
			for _, change := range changes {
				seenWall := map[string]bool{}
				prev := change.Add(-6 * time.Hour)
				for _, at := range walk(s, prev, change.Add(6*time.Hour)) {
					require.True(t, at.After(prev), "%s %q: %s after %s", zone, expr, at, prev)
					require.Equal(t, reference(prev), at, "%s %q: next after %s", zone, expr, prev)
					w := at.Format("2006-01-02 15:04")
					require.False(t, seenWall[w], "%s %q: wall time %s fired twice", zone, expr, w)
					seenWall[w] = true
					prev = at
				}
				require.NotEmpty(t, seenWall, "%s %q near %s", zone, expr, change)
				// From any instant, not only from occurrences: inside a repeated hour, say.
				for from := change.Add(-3 * time.Hour); from.Before(change.Add(3 * time.Hour)); from = from.Add(10 * time.Minute) {
					require.Equal(t, reference(from), s.Next(from), "%s %q: next after %s", zone, expr, from)
				}
			}
		}
	}
}
