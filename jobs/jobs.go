// Package jobs holds billingd's River jobs, one file per kind: its args, its worker, the rules
// that only it uses, and its tests. The daemon (package worker) wires them in through Register
// and PeriodicJobs; it holds none of their logic.
package jobs

import (
	"log/slog"
	"slices"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/config"
)

// Queues billingd works. Charges have their own queue so that a backlog of webhooks or
// notifications never delays money, and the reverse.
const (
	QueueDefault       = river.QueueDefault
	QueueCharges       = "charges"
	QueueWebhooks      = "webhooks"
	QueueNotifications = "notifications"
)

// Deps is what workers share: the database, Stripe, the logger and the settings. The
// installation id is read from the database on first use (Installation). A Deps is used through
// its pointer, never copied.
type Deps struct {
	Pool   *pgxpool.Pool
	Stripe *stripe.Client
	Logger *slog.Logger
	Config *config.Config

	// charging holds the charge job's settings once Register has run (SettlePaymentIntentTx).
	charging *charging
	// installation keeps the installation id once read (Installation).
	installation installationCache
}

// oneAtATime is the UniqueOpts of a periodic trigger (due, prune_webhook_events): at most one of
// its jobs waits or runs, so a tick that comes while a run is going inserts nothing; that run
// sees what the tick would have.
var oneAtATime = river.UniqueOpts{ByState: []rivertype.JobState{
	rivertype.JobStateAvailable, rivertype.JobStatePending,
	rivertype.JobStateRunning, rivertype.JobStateScheduled,
}}

// Kinds lists the job kinds that Register adds.
func Kinds() []string {
	return slices.Concat(
		chargeKinds(),
		[]string{IngestEventArgs{}.Kind(), StartSetupArgs{}.Kind(), DueArgs{}.Kind(), PruneWebhookEventsArgs{}.Kind()},
		recoveryKinds(),
	)
}

// Register adds every job kind's worker to workers.
func Register(workers *river.Workers, d *Deps) error {
	if err := registerCharge(workers, d); err != nil {
		return err
	}
	river.AddWorker(workers, &IngestEventWorker{deps: d})
	river.AddWorker(workers, &StartSetupWorker{deps: d})
	if err := registerRecovery(workers, d); err != nil {
		return err
	}
	river.AddWorker(workers, NewDueWorker(d))
	river.AddWorker(workers, &pruneWebhookEventsWorker{d: d})
	return nil
}

// PeriodicJobs returns the periodic jobs of the daemon. River runs them on the elected leader
// only; each is a trigger, and what it acts on lives in the database, so a restart or a new
// leader misses nothing and repeats nothing.
func PeriodicJobs(d *Deps) ([]*river.PeriodicJob, error) {
	var all []*river.PeriodicJob
	charge, err := chargePeriodicJobs(d)
	if err != nil {
		return nil, err
	}
	all = append(all, charge...)
	recovery, err := recoveryPeriodicJobs(d)
	if err != nil {
		return nil, err
	}
	all = append(all, recovery...)
	due, err := newDuePeriodicJob(d)
	if err != nil {
		return nil, err
	}
	all = append(all, due, pruneWebhookEventsPeriodic())
	return all, nil
}
