// Returns 0 once the broker answers a metadata request (describeCluster), 1 on timeout.
// Run by broker.sh with Java's single-file source launcher, on the broker's own jars.
//   WaitReady BOOTSTRAP SECONDS [CLIENT_PROPERTIES]   (the file: TLS settings, secured mode)
import java.io.FileInputStream;
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;

public class WaitReady {
    public static void main(String[] args) throws Exception {
        String bootstrap = args[0];
        long deadline = System.currentTimeMillis() + Long.parseLong(args[1]) * 1000L;
        Properties props = new Properties();
        if (args.length > 2) {
            try (FileInputStream in = new FileInputStream(args[2])) {
                props.load(in);
            }
        }
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "2000");
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "3000");
        while (System.currentTimeMillis() < deadline) {
            try (Admin admin = Admin.create(props)) {
                int nodes = admin.describeCluster().nodes().get(3, TimeUnit.SECONDS).size();
                if (nodes > 0) {
                    System.out.println("broker ready at " + bootstrap + " (" + nodes + " node)");
                    return;
                }
            } catch (Exception e) {
                Thread.sleep(300);
            }
        }
        System.err.println("broker at " + bootstrap + " did not answer a metadata request in time");
        System.exit(1);
    }
}
