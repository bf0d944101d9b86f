package jobs_test

import (
	"testing"

	"github.com/riverqueue/river"
	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/jobs"
)

// TestPruneWebhookEvents runs the retention job over events of every age and state: ingested
// events older than the retention go, in several batches; recent ones and those never ingested
// stay, whatever their age.
func TestPruneWebhookEvents(t *testing.T) {
	t.Parallel()
	b := setup(t, nil) // the default retention, 30 days
	exec := func(sql string, args ...any) {
		t.Helper()
		_, err := b.pool.Exec(t.Context(), sql, args...)
		require.NoError(t, err)
	}
	insert := func(prefix string, n int, age string, status string) {
		t.Helper()
		exec(`insert into billing.webhook_events (id, type, created, payload, status, received_at, processed_at)
			select 'evt_'||$1||i, 'payment_intent.succeeded', now() - $2::interval, '{"object": "event"}', $3,
			       now() - $2::interval, case when $3 = 'received' then null else now() - $2::interval end
			  from generate_series(1, $4) i`, prefix, age, status, n)
	}
	insert("old_processed_", 12000, "31 days", "processed") // more than two batches
	insert("old_ignored_", 3, "90 days", "ignored")
	insert("old_failed_", 2, "40 days", "failed")
	insert("old_unread_", 4, "60 days", "received") // never ingested: kept
	insert("recent_", 5, "29 days", "processed")

	res, err := b.client.Insert(t.Context(), jobs.PruneWebhookEventsArgs{}, nil)
	require.NoError(t, err)
	requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "prune_webhook_events", res.Job.ID))

	left := map[string]int{}
	rows, err := b.pool.Query(t.Context(), `select regexp_replace(id, '^evt_|_[0-9]+$', '', 'g'), count(*)
		from billing.webhook_events group by 1`)
	require.NoError(t, err)
	for rows.Next() {
		var k string
		var n int
		require.NoError(t, rows.Scan(&k, &n))
		left[k] = n
	}
	require.NoError(t, rows.Err())
	require.Equal(t, map[string]int{"old_unread": 4, "recent": 5}, left)
	require.Contains(t, b.logs.String(), `msg="webhook events pruned" count=12005`)
}
