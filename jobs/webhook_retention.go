package jobs

import (
	"context"
	"fmt"
	"time"

	"github.com/riverqueue/river"
	"github.com/robfig/cron/v3"
)

// PruneWebhookEventsArgs triggers the deletion of stored webhook events that were ingested more
// than BILLING_WEBHOOK_RETENTION ago. Their payloads carry customers' names, emails and card
// details, and the table would otherwise grow for ever; an event is only needed while Stripe may
// still deliver it again (three days), to recognize the duplicate. Events not yet ingested are
// kept whatever their age. It is an hourly periodic job.
type PruneWebhookEventsArgs struct{}

// Kind is the job kind.
func (PruneWebhookEventsArgs) Kind() string { return "prune_webhook_events" }

// InsertOpts puts the job on the default queue, at most one waiting or running.
func (PruneWebhookEventsArgs) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: QueueDefault, MaxAttempts: 3, UniqueOpts: oneAtATime}
}

// pruneWebhookEventsBatch bounds the rows one statement deletes.
const pruneWebhookEventsBatch = 5000

// pruneWebhookEventsQuery deletes at most $2 ingested events received more than $1 seconds ago,
// oldest first (webhook_events_ingested_idx), skipping rows another transaction holds.
const pruneWebhookEventsQuery = `
with doomed as (
    select id from billing.webhook_events
     where status <> 'received' and received_at < now() - make_interval(secs => $1)
     order by received_at
     limit $2
       for update skip locked
)
delete from billing.webhook_events e using doomed d where e.id = d.id`

type pruneWebhookEventsWorker struct {
	river.WorkerDefaults[PruneWebhookEventsArgs]
	d *Deps
}

// Work deletes batch after batch until a batch finds less than a full one, or ctx ends.
func (w *pruneWebhookEventsWorker) Work(ctx context.Context, _ *river.Job[PruneWebhookEventsArgs]) error {
	retention := w.d.Config.WebhookRetention
	start := time.Now()
	total := 0
	for {
		tag, err := w.d.Pool.Exec(ctx, pruneWebhookEventsQuery, retention.Seconds(), pruneWebhookEventsBatch)
		if err != nil {
			return fmt.Errorf("prune webhook events older than %s: %w", retention, err)
		}
		total += int(tag.RowsAffected())
		if tag.RowsAffected() < pruneWebhookEventsBatch {
			break
		}
	}
	if total > 0 {
		w.d.Logger.Info("webhook events pruned", "count", total, "older_than", retention,
			"duration", time.Since(start).Round(time.Millisecond))
	}
	return nil
}

// pruneWebhookEventsPeriodic runs the job every hour, and once when a leader starts.
func pruneWebhookEventsPeriodic() *river.PeriodicJob {
	return river.NewPeriodicJob(cron.Every(time.Hour), func() (river.JobArgs, *river.InsertOpts) {
		return PruneWebhookEventsArgs{}, nil
	}, &river.PeriodicJobOpts{ID: "prune_webhook_events", RunOnStart: true})
}
